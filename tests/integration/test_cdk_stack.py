"""The CDK stack of deploy/aws, synthesized (jsii on Node.js, no AWS account) and checked for its security properties.

Two deployments are synthesized once for the module: one in front of an existing endpoint with API
keys on, one that creates the endpoint from the sdgate image with keys off. Bundling of the Lambda
package is skipped (``aws:cdk:bundling-stacks``): it needs pip and the network, and the template does
not depend on the package's contents.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from sdgate.config import Settings
from sdgate.jobstore.dynamodb import TABLE, TTL_ATTRIBUTE
from sdgate.storage import new_key, sidecar_key

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "aws"
ACCOUNT, REGION = "123456789012", "eu-west-1"
ECR_IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sdgate:0.1.0"
CACHING_OPTIMIZED = "658327ea-f89d-4fab-a63d-7e88639e58f6"  # the managed cache policy's id

Template = dict[str, Any]


@pytest.fixture(scope="module")
def stack_module() -> Any:
    # jsii's banners about the Node.js version say nothing about this project (set before jsii starts).
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "18,20")
    sys.path.insert(0, str(DEPLOY))
    try:
        import stack
    finally:
        sys.path.remove(str(DEPLOY))
    return stack


@pytest.fixture(scope="module")
def templates(stack_module: Any) -> dict[str, Template]:
    import aws_cdk as cdk

    app = cdk.App(context={"aws:cdk:bundling-stacks": []})
    env = cdk.Environment(account=ACCOUNT, region=REGION)
    configs = {
        "existing": stack_module.StackConfig(endpoint_name="jumpstart-sd", quota_per_day=500),
        "created": stack_module.StackConfig(
            stage="dev",
            endpoint_name="sdgate-sd",
            image_uri=ECR_IMAGE,
            api_key=False,
            worker_concurrency=4,
            architecture="x86_64",
            max_instances=4,
            invocations_per_instance=30,
        ),
    }
    for name, config in configs.items():
        stack_module.SdgateStack(app, f"sdgate-{name}", config, env=env)
    assembly = app.synth()
    return {name: assembly.get_stack_by_name(f"sdgate-{name}").template for name in configs}


@pytest.fixture(scope="module")
def existing(templates: dict[str, Template]) -> Template:
    return templates["existing"]


@pytest.fixture(scope="module")
def created(templates: dict[str, Template]) -> Template:
    return templates["created"]


# -- reading a template -------------------------------------------------------------------------------


def flat(value: Any) -> str:
    """An intrinsic as readable text.

    ``{"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}]]}`` → ``arn:${AWS::Partition}``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return str(sep).join(flat(p) for p in parts)
    if isinstance(value, dict) and "Ref" in value:
        return "${" + str(value["Ref"]) + "}"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return "${" + ".".join(value["Fn::GetAtt"]) + "}"
    return json.dumps(value, sort_keys=True)


def resources(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == kind}


def one(template: Template, kind: str) -> tuple[str, dict[str, Any]]:
    [(name, resource)] = resources(template, kind).items()
    return name, resource["Properties"]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statements(template: Template) -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every IAM policy and bucket policy, with the name of what it belongs to."""
    out = []
    for kind in ("AWS::IAM::Policy", "AWS::S3::BucketPolicy"):
        for name, r in resources(template, kind).items():
            out += [(name, s) for s in r["Properties"]["PolicyDocument"]["Statement"]]
    for name, r in resources(template, "AWS::IAM::Role").items():
        for policy in r["Properties"].get("Policies", []):
            out += [(name, s) for s in policy["PolicyDocument"]["Statement"]]
    return out


def function(template: Template, prefix: str) -> tuple[str, dict[str, Any]]:
    [(name, r)] = [(k, r) for k, r in resources(template, "AWS::Lambda::Function").items() if k.startswith(prefix)]
    return name, r["Properties"]


def policy_of(template: Template, function_prefix: str) -> list[dict[str, Any]]:
    _, props = function(template, function_prefix)
    role = props["Role"]["Fn::GetAtt"][0]
    return [
        s
        for r in resources(template, "AWS::IAM::Policy").values()
        if {"Ref": role} in r["Properties"]["Roles"]
        for s in r["Properties"]["PolicyDocument"]["Statement"]
    ]


def bucket_name(template: Template) -> str:
    return one(template, "AWS::S3::Bucket")[0]


# -- storage -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["existing", "created"])
def test_bucket_is_private_encrypted_tls_only_and_expires_old_images(
    templates: dict[str, Template], variant: str
) -> None:
    template = templates[variant]
    name, bucket = one(template, "AWS::S3::Bucket")
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    [encryption] = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert bucket["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    rules = {r["Id"]: r for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-old-images"] == {
        "Id": "expire-old-images",
        "Prefix": "images/",
        "ExpirationInDays": 30,
        "Status": "Enabled",
    }
    assert template["Resources"][name]["DeletionPolicy"] == "Retain"  # users' images outlive the stack
    _, policy = one(template, "AWS::S3::BucketPolicy")
    denies = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert [s.get("Condition") for s in denies] == [{"Bool": {"aws:SecureTransport": "false"}}, None]


def test_cloudfront_reads_the_bucket_through_origin_access_control_only(existing: Template) -> None:
    oac_name, oac = one(existing, "AWS::CloudFront::OriginAccessControl")
    assert oac["OriginAccessControlConfig"]["OriginAccessControlOriginType"] == "s3"
    assert oac["OriginAccessControlConfig"]["SigningBehavior"] == "always"
    assert oac["OriginAccessControlConfig"]["SigningProtocol"] == "sigv4"
    cdn_name, cdn = one(existing, "AWS::CloudFront::Distribution")
    config = cdn["DistributionConfig"]
    [origin] = config["Origins"]
    assert origin["OriginAccessControlId"] == {"Fn::GetAtt": [oac_name, "Id"]}
    assert origin["S3OriginConfig"]["OriginAccessIdentity"] == ""  # no legacy OAI
    assert flat(origin["DomainName"]) == "${" + bucket_name(existing) + ".RegionalDomainName}"
    behavior = config["DefaultCacheBehavior"]
    assert behavior["ViewerProtocolPolicy"] == "https-only"
    assert behavior["CachePolicyId"] == CACHING_OPTIMIZED
    assert behavior["AllowedMethods"] == ["GET", "HEAD"]
    # The bucket lets exactly this distribution read objects, and nothing else in.
    _, policy = one(existing, "AWS::S3::BucketPolicy")
    [allow] = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert allow["Principal"] == {"Service": "cloudfront.amazonaws.com"}
    assert allow["Action"] == "s3:GetObject"
    assert flat(allow["Resource"]) == "${" + bucket_name(existing) + ".Arn}/*"
    source = flat(allow["Condition"]["StringEquals"]["AWS:SourceArn"])
    assert source == "arn:${AWS::Partition}:cloudfront::${AWS::AccountId}:distribution/${" + cdn_name + "}"


def test_cloudfront_may_read_the_images_but_not_their_sidecars(existing: Template) -> None:
    """A sidecar holds the prompt; the URL of its image is made to be shared."""
    _, policy = one(existing, "AWS::S3::BucketPolicy")
    cloudfront = {"Service": "cloudfront.amazonaws.com"}
    [deny] = [
        s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Deny" and s["Principal"] == cloudfront
    ]
    assert deny["Action"] == "s3:GetObject"
    assert "Condition" not in deny  # whichever distribution asks
    arn = "${" + bucket_name(existing) + ".Arn}/"
    denied = [flat(r).removeprefix(arn) for r in as_list(deny["Resource"])]
    assert denied == ["images/private/*", "images/*.json"]
    # The patterns as S3 reads them (``*`` spans slashes, as in fnmatch), on keys as sdgate makes them.
    for ext in ("jpeg", "png", "webp"):
        image = new_key(ext)
        legacy = image.rsplit(".", 1)[0] + ".json"  # where earlier versions put the sidecar
        for key, refused in ((image, False), (sidecar_key(image), True), (legacy, True)):
            assert any(fnmatch.fnmatchcase(f"images/{key}", p) for p in denied) is refused, key


def test_job_table_is_the_stores_own_with_ttl(existing: Template, stack_module: Any) -> None:
    name, table = one(existing, "AWS::DynamoDB::Table")
    assert table["KeySchema"] == TABLE["KeySchema"]
    assert sorted(table["AttributeDefinitions"], key=str) == sorted(TABLE["AttributeDefinitions"], key=str)
    assert sorted(table["GlobalSecondaryIndexes"], key=str) == sorted(TABLE["GlobalSecondaryIndexes"], key=str)
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert existing["Resources"][name]["DeletionPolicy"] == "Retain"


# -- least privilege -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["existing", "created"])
def test_no_statement_allows_a_wildcard_action_or_every_resource(templates: dict[str, Template], variant: str) -> None:
    checked = 0
    for owner, s in statements(templates[variant]):
        if s["Effect"] != "Allow":
            continue
        checked += 1
        actions = as_list(s["Action"])
        assert not [a for a in actions if "*" in a], (owner, s)
        if "*" in as_list(s.get("Resource")):
            # The one action IAM takes only on every resource (an account-wide ECR login).
            assert actions == ["ecr:GetAuthorizationToken"], (owner, s)
    assert checked >= 8
    for name, role in resources(templates[variant], "AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role["Properties"], name  # no AWS-managed policy rides along


def test_the_worker_may_invoke_the_one_endpoint_and_write_under_the_images_prefix(existing: Template) -> None:
    worker = policy_of(existing, "WorkerFunction")
    by_action = {a: flat(s["Resource"]) for s in worker for a in as_list(s["Action"])}
    assert by_action["sagemaker:InvokeEndpoint"] == (
        f"arn:${{AWS::Partition}}:sagemaker:{REGION}:{ACCOUNT}:endpoint/jumpstart-sd"
    )
    images = "${" + bucket_name(existing) + ".Arn}/images/*"
    assert by_action["s3:PutObject"] == by_action["s3:DeleteObject"] == images
    table = "${" + one(existing, "AWS::DynamoDB::Table")[0] + ".Arn}"
    assert by_action["dynamodb:GetItem"] == by_action["dynamodb:PutItem"] == table
    logs = [n for n in resources(existing, "AWS::Logs::LogGroup") if n.startswith("WorkerFunction")]
    assert by_action["logs:PutLogEvents"] == "${" + logs[0] + ".Arn}"
    assert by_action["s3:GetObject"] == images.replace("/images/*", "/images/private/*")  # input images only
    assert set(by_action) == {
        "sagemaker:InvokeEndpoint",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }


def test_the_api_function_may_only_record_jobs_store_inputs_and_invoke_the_worker(existing: Template) -> None:
    api = policy_of(existing, "ApiFunction")
    actions = {a for s in api for a in as_list(s["Action"])}
    assert actions == {
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:Query",
        "lambda:InvokeFunction",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "s3:PutObject",
        "s3:DeleteObject",
    }
    # Objects only under the private prefix: the input images of requests, never an image or a sidecar.
    inputs = "${" + bucket_name(existing) + ".Arn}/images/private/*"
    for s in api:
        if any(a.startswith("s3:") for a in as_list(s["Action"])):
            assert flat(s["Resource"]) == inputs
    [invoke] = [s for s in api if s["Action"] == "lambda:InvokeFunction"]
    worker, _ = function(existing, "WorkerFunction")
    assert invoke["Resource"] == {"Fn::GetAtt": [worker, "Arn"]}


def test_a_created_endpoint_is_the_one_the_worker_may_invoke(created: Template) -> None:
    _, model = one(created, "AWS::SageMaker::Model")
    assert model["PrimaryContainer"]["Image"] == ECR_IMAGE
    assert model["PrimaryContainer"]["Environment"] == {"SDGATE_MODEL": "stabilityai/stable-diffusion-2-1-base"}
    _, config = one(created, "AWS::SageMaker::EndpointConfig")
    [variant] = config["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.g5.xlarge", 1)
    _, endpoint = one(created, "AWS::SageMaker::Endpoint")
    assert endpoint["EndpointName"] == "sdgate-sd"
    [invoke] = [s for s in policy_of(created, "WorkerFunction") if s["Action"] == "sagemaker:InvokeEndpoint"]
    assert flat(invoke["Resource"]).endswith(f":sagemaker:{REGION}:{ACCOUNT}:endpoint/sdgate-sd")
    # The model's role pulls from its own repository only.
    role = model["ExecutionRoleArn"]["Fn::GetAtt"][0]
    pulls = [
        s
        for r in resources(created, "AWS::IAM::Policy").values()
        if {"Ref": role} in r["Properties"]["Roles"]
        for s in r["Properties"]["PolicyDocument"]["Statement"]
        if "ecr:BatchGetImage" in as_list(s["Action"])
    ]
    assert [flat(s["Resource"]) for s in pulls] == [f"arn:${{AWS::Partition}}:ecr:{REGION}:{ACCOUNT}:repository/sdgate"]
    _, worker = function(created, "WorkerFunction")
    assert worker["ReservedConcurrentExecutions"] == 4
    assert worker["Architectures"] == ["x86_64"]


def test_a_created_endpoint_autoscales_on_invocations_per_instance(created: Template, existing: Template) -> None:
    [(name, scalable)] = resources(created, "AWS::ApplicationAutoScaling::ScalableTarget").items()
    target = scalable["Properties"]
    assert target["ServiceNamespace"] == "sagemaker"
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert flat(target["ResourceId"]) == "endpoint/sdgate-sd/variant/AllTraffic"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)  # the floor: instance_count
    endpoint, _ = one(created, "AWS::SageMaker::Endpoint")
    assert endpoint in as_list(scalable.get("DependsOn", []))  # registered once the variant exists
    _, policy = one(created, "AWS::ApplicationAutoScaling::ScalingPolicy")
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["ScalingTargetId"] == {"Ref": name}
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }
    assert (tracking["TargetValue"], tracking["ScaleOutCooldown"], tracking["ScaleInCooldown"]) == (30, 60, 300)
    assert resources(existing, "AWS::ApplicationAutoScaling::ScalableTarget") == {}  # not asked for: none


def test_autoscaling_bounds_come_from_context_and_are_checked(stack_module: Any) -> None:
    import aws_cdk as cdk

    config = stack_module.StackConfig.from_context(
        cdk.App(context={"endpoint_name": "ep", "min_instances": "2", "max_instances": "6"})
    )
    assert (config.min_instances, config.max_instances, config.invocations_per_instance) == (2, 6, 20.0)
    for bad in ({"min_instances": "3", "max_instances": "2"}, {"min_instances": "0", "max_instances": "2"}):
        with pytest.raises(ValueError, match="min_instances <= max_instances"):
            stack_module.StackConfig.from_context(cdk.App(context={"endpoint_name": "ep", **bad}))


# -- the functions -------------------------------------------------------------------------------------


def test_functions_run_the_handler_with_settings_sdgate_accepts(existing: Template) -> None:
    cdn = one(existing, "AWS::CloudFront::Distribution")[0]
    for prefix, timeout in (("ApiFunction", 29), ("WorkerFunction", 900)):
        _, fn = function(existing, prefix)
        assert (fn["Handler"], fn["Runtime"], fn["Timeout"]) == (
            "sdgate.aws.lambda_handler.handler",
            "python3.12",
            timeout,
        )
        env = {k: flat(v) for k, v in fn["Environment"]["Variables"].items()}
        assert env["SDGATE_PUBLIC_BASE_URL"] == "https://${" + cdn + ".DomainName}"
        assert env["SDGATE_S3_BUCKET"] == "${" + bucket_name(existing) + "}"
        assert (env["SDGATE_BACKEND"], env["SDGATE_STORAGE"], env["SDGATE_JOB_STORE"]) == (
            "sagemaker",
            "s3",
            "dynamodb",
        )
        # Every variable is a setting sdgate knows, and together they pass its checks.
        fields = {k.removeprefix("SDGATE_").lower(): v.replace("${", "x").replace("}", "") for k, v in env.items()}
        settings = Settings(**fields)  # type: ignore[arg-type]
        assert settings.retention_s == 30 * 86400
    _, api = function(existing, "ApiFunction")
    worker, _ = function(existing, "WorkerFunction")
    assert api["Environment"]["Variables"]["SDGATE_WORKER_FUNCTION"] == {"Ref": worker}
    [(_, invoke_config)] = [
        (k, r["Properties"]) for k, r in resources(existing, "AWS::Lambda::EventInvokeConfig").items()
    ]
    assert invoke_config["FunctionName"] == {"Ref": worker}
    assert invoke_config["MaximumRetryAttempts"] == 0  # a retried generation is a second one to pay for


# -- the API ---------------------------------------------------------------------------------------------


def routes(template: Template) -> dict[tuple[str, str], dict[str, Any]]:
    paths: dict[str, str] = {}
    res = resources(template, "AWS::ApiGateway::Resource")

    def path(ref: Any) -> str:
        if isinstance(ref, dict) and "Fn::GetAtt" in ref:  # the root
            return ""
        name = ref["Ref"]
        if name not in paths:
            props = res[name]["Properties"]
            paths[name] = path(props["ParentId"]) + "/" + props["PathPart"]
        return paths[name]

    return {
        (m["Properties"]["HttpMethod"], path(m["Properties"]["ResourceId"])): m["Properties"]
        for m in resources(template, "AWS::ApiGateway::Method").values()
    }


@pytest.mark.parametrize("variant", ["existing", "created"])
def test_api_routes_keys_throttling_and_binary_types(templates: dict[str, Template], variant: str) -> None:
    template = templates[variant]
    keys_on = variant == "existing"
    api_fn, _ = function(template, "ApiFunction")
    found = routes(template)
    assert set(found) == {("POST", "/text2image"), ("GET", "/text2image"), ("ANY", "/v1/{proxy+}")}
    for method in found.values():
        assert method["ApiKeyRequired"] is keys_on
        assert method["Integration"]["Type"] == "AWS_PROXY"
        assert api_fn in flat(method["Integration"]["Uri"])
    _, api = one(template, "AWS::ApiGateway::RestApi")
    assert api["BinaryMediaTypes"] == ["image/*"]
    _, stage = one(template, "AWS::ApiGateway::Stage")
    [settings] = stage["MethodSettings"]
    assert (settings["ThrottlingRateLimit"], settings["ThrottlingBurstLimit"]) == (5, 10)
    # API Gateway may invoke the API function, only from this API.
    rest_api = one(template, "AWS::ApiGateway::RestApi")[0]
    for permission in resources(template, "AWS::Lambda::Permission").values():
        props = permission["Properties"]
        assert props["Principal"] == "apigateway.amazonaws.com"
        assert props["FunctionName"] == {"Fn::GetAtt": [api_fn, "Arn"]}
        assert "${" + rest_api + "}" in flat(props["SourceArn"])
    if keys_on:
        _, plan = one(template, "AWS::ApiGateway::UsagePlan")
        assert plan["Throttle"] == {"BurstLimit": 10, "RateLimit": 5}
        assert plan["Quota"] == {"Limit": 500, "Period": "DAY"}
        key, _ = one(template, "AWS::ApiGateway::ApiKey")
        _, link = one(template, "AWS::ApiGateway::UsagePlanKey")
        assert link["KeyId"] == {"Ref": key}
    else:
        assert not resources(template, "AWS::ApiGateway::ApiKey")
        assert not resources(template, "AWS::ApiGateway::UsagePlan")


@pytest.mark.parametrize("variant", ["existing", "created"])
def test_outputs_say_where_it_answers(templates: dict[str, Template], variant: str) -> None:
    outputs = {k: flat(v["Value"]) for k, v in templates[variant]["Outputs"].items()}
    assert {"ApiUrl", "CurlCommand", "CloudFrontDomain", "BucketName", "JobsTable"} <= set(outputs)
    assert outputs["ApiUrl"].startswith("https://") and outputs["ApiUrl"].endswith("/")
    curl = outputs["CurlCommand"]
    assert curl.startswith("curl -s " + outputs["ApiUrl"] + "text2image ")
    assert """-d '{"text": "astronaut on a horse"}'""" in curl
    assert ("x-api-key: $SDGATE_API_KEY" in curl) is (variant == "existing")
    assert ("ApiKeyCommand" in outputs) is (variant == "existing")
    cdn = one(templates[variant], "AWS::CloudFront::Distribution")[0]
    assert outputs["CloudFrontDomain"] == "${" + cdn + ".DomainName}"


# -- configuration and package ---------------------------------------------------------------------------


def test_config_comes_from_context_or_environment_and_refuses_a_missing_endpoint(
    stack_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aws_cdk as cdk

    config = stack_module.StackConfig.from_context(
        cdk.App(context={"endpoint_name": "ep", "api_key": "false", "rate_limit": "2.5", "instance_count": "2"})
    )
    assert (config.endpoint_name, config.api_key, config.rate_limit, config.instance_count) == ("ep", False, 2.5, 2)
    monkeypatch.setenv("SDGATE_DEPLOY_ENDPOINT_NAME", "from-env")
    monkeypatch.setenv("SDGATE_DEPLOY_STAGE", "staging")
    config = stack_module.StackConfig.from_context(cdk.App())
    assert (config.endpoint_name, config.stage) == ("from-env", "staging")
    monkeypatch.delenv("SDGATE_DEPLOY_ENDPOINT_NAME")
    with pytest.raises(ValueError, match="endpoint_name"):
        stack_module.StackConfig.from_context(cdk.App())
    with pytest.raises(ValueError, match="api_key must be true or false"):
        stack_module.StackConfig.from_context(cdk.App(context={"endpoint_name": "ep", "api_key": "maybe"}))


def test_the_lambda_package_is_the_gateway_without_model_libraries(stack_module: Any, tmp_path: Path) -> None:
    requirements = stack_module.lambda_requirements()
    names = {r.split("[")[0].split(">")[0].split("=")[0].strip() for r in requirements}
    assert {"fastapi", "pydantic-settings", "pillow", "boto3", "mangum"} <= names
    assert not names & {"torch", "diffusers", "transformers", "uvicorn"}
    stack_module.copy_sources(tmp_path)
    assert (tmp_path / "sdgate" / "aws" / "lambda_handler.py").is_file()
    assert not (tmp_path / "sdgate" / "models").exists()
    assert not list(tmp_path.rglob("__pycache__"))
