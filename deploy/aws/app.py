"""The CDK app: ``cdk synth`` / ``cdk deploy`` run it (see cdk.json and the README's "Deploy on AWS")."""

from __future__ import annotations

import os

import aws_cdk as cdk
from stack import SdgateStack, StackConfig  # beside this file: `python app.py` puts its folder on the path


def main() -> None:
    app = cdk.App()
    config = StackConfig.from_context(app)
    region = app.node.try_get_context("region") or os.environ.get("CDK_DEFAULT_REGION")
    env = cdk.Environment(account=os.environ.get("CDK_DEFAULT_ACCOUNT"), region=region)
    SdgateStack(app, f"sdgate-{config.stage}", config, env=env, description="sdgate: Stable Diffusion on AWS")
    app.synth()


if __name__ == "__main__":
    main()
