"""The AWS stack of sdgate: API Gateway → Lambda (API + worker) → SageMaker endpoint, DynamoDB, S3 + CloudFront.

What is safer than the hand-written original:

- the bucket is private (all public access blocked, ACLs off, TLS only, encrypted); CloudFront reads
  it through Origin Access Control, HTTPS only, and caches (image keys are immutable), but never the
  sidecars under ``images/private/``: they hold the prompts of images whose URLs are shared;
- old images expire by a lifecycle rule, old job records by DynamoDB's TTL, after the same days;
- each function has its own role with only what it uses: the API function may write job records and
  invoke the worker, nothing else; the worker may invoke the one endpoint and put objects under the
  images prefix of the one bucket. No action is a wildcard; no statement names every resource;
- the API takes API keys, with throttling per key (usage plan) and for the whole stage.

Long generations: the API function hands every job to the worker function (an asynchronous
invocation) and waits for it until just before API Gateway's 29 s, then answers 202; the worker
has 15 minutes. See ``sdgate/jobs/dispatch.py`` for why this, rather than SageMaker async inference.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import (
    AssetHashType,
    BundlingOptions,
    CfnOutput,
    DockerImage,
    Duration,
    ILocalBundling,
    RemovalPolicy,
    Stack,
)
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudfront as cloudfront
from aws_cdk import aws_cloudfront_origins as origins
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from sdgate.jobstore.dynamodb import INDEXES, TTL_ATTRIBUTE
from sdgate.storage import PRIVATE_PREFIX

REPO = Path(__file__).resolve().parents[2]
RUNTIME = lambda_.Runtime.PYTHON_3_12
HANDLER = "sdgate.aws.lambda_handler.handler"
IMAGES_PREFIX = "images"
API_TIMEOUT_S = 29  # API Gateway's default integration timeout: no point in the API function outliving it
WORKER_TIMEOUT_S = 900  # Lambda's maximum
WORKER_MAX_EVENT_AGE_S = 3600  # a job whose worker has not started within an hour fails rather than waits on
_ECR_IMAGE = re.compile(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)")


@dataclass(frozen=True)
class StackConfig:
    """What a deployment chooses: ``cdk deploy -c name=value`` or ``SDGATE_DEPLOY_<NAME>=value``."""

    stage: str = "prod"
    endpoint_name: str | None = None
    """An existing SageMaker endpoint; or, with ``image_uri``, the name of the one to create."""
    image_uri: str | None = None
    """The sdgate container image (ECR): the stack creates the model, endpoint config and endpoint."""
    model: str = "stabilityai/stable-diffusion-2-1-base"
    """``SDGATE_MODEL`` of the container: a Hugging Face model id, or a path under /opt/ml/model."""
    model_data_url: str | None = None
    """Optional ``s3://.../model.tar.gz`` that SageMaker unpacks into /opt/ml/model."""
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    api_key: bool = True
    rate_limit: float = 5.0
    """Requests per second, steady (stage and each key)."""
    burst_limit: int = 10
    quota_per_day: int | None = None
    """Requests per API key and day (usage plan); none when unset."""
    retention_days: int = 30
    """Images and job records are deleted after this many days."""
    architecture: str = "arm64"
    worker_concurrency: int | None = None
    """Reserved concurrency of the worker: at most this many generations reach the endpoint at once."""
    max_instances: int | None = None
    """Autoscaling of the endpoint's variant up to this many instances; off when unset."""
    min_instances: int | None = None
    """Autoscaling's floor (default: ``instance_count``; SageMaker keeps at least one)."""
    invocations_per_instance: float = 20.0
    """Autoscaling's target: invocations per instance and minute (about what one instance serves in a minute)."""
    variant_name: str = "AllTraffic"
    """The endpoint's production variant that autoscaling scales (the stack's own endpoint has this one)."""

    @classmethod
    def from_context(cls, scope: Construct) -> StackConfig:
        """Each field from the CDK context, else ``SDGATE_DEPLOY_<FIELD>``, else its default."""
        values: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            raw = scope.node.try_get_context(name)
            if raw is None:
                raw = os.environ.get(f"SDGATE_DEPLOY_{name.upper()}")
            if raw is None or raw == "":
                continue
            values[name] = _parse(name, raw, str(f.type))
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if not self.endpoint_name and not self.image_uri:
            raise ValueError(
                "name the SageMaker endpoint: -c endpoint_name=<existing endpoint>, "
                "or deploy one with -c image_uri=<sdgate image in ECR> (and -c endpoint_name=<name>)"
            )
        if self.architecture not in ("arm64", "x86_64"):
            raise ValueError(f"architecture must be arm64 or x86_64, got {self.architecture!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.stage):
            raise ValueError(f"stage must be letters, digits, - or _, got {self.stage!r}")
        if self.max_instances is not None:
            floor = self.min_instances if self.min_instances is not None else self.instance_count
            if floor < 1 or self.max_instances < floor:
                raise ValueError(
                    f"autoscaling needs 1 <= min_instances <= max_instances, got {floor} and {self.max_instances}"
                )
            if self.invocations_per_instance <= 0:
                raise ValueError("invocations_per_instance must be above 0")


def _parse(name: str, raw: Any, kind: str) -> Any:
    if not isinstance(raw, str):
        return raw
    if "bool" in kind:
        if raw.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            raise ValueError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in ("true", "1", "on", "yes")
    if "int" in kind:
        return int(raw)
    if "float" in kind:
        return float(raw)
    return raw


class SdgateStack(Stack):  # type: ignore[misc]  # Stack is Any to mypy: see pyproject.toml
    """sdgate on one AWS account: ``cdk deploy`` and it answers at the ``ApiUrl`` output."""

    def __init__(self, scope: Construct, construct_id: str, config: StackConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, **kwargs)
        config.check()
        self.config = config
        endpoint_name = config.endpoint_name or f"sdgate-{config.stage}"

        # 1. storage: a private bucket, CloudFront in front of it
        bucket = s3.Bucket(
            self,
            "Images",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-old-images",
                    prefix=f"{IMAGES_PREFIX}/",
                    expiration=Duration.days(config.retention_days),
                ),
                s3.LifecycleRule(
                    id="abort-incomplete-uploads", abort_incomplete_multipart_upload_after=Duration.days(1)
                ),
            ],
            # Users' images outlive the stack: `cdk destroy` leaves the bucket (see the README's teardown).
            removal_policy=RemovalPolicy.RETAIN,
        )
        distribution = cloudfront.Distribution(
            self,
            "Cdn",
            comment=f"sdgate images ({config.stage})",
            default_behavior=cloudfront.BehaviorOptions(
                origin=origins.S3BucketOrigin.with_origin_access_control(
                    bucket, origin_access_levels=[cloudfront.AccessLevel.READ]
                ),
                viewer_protocol_policy=cloudfront.ViewerProtocolPolicy.HTTPS_ONLY,
                allowed_methods=cloudfront.AllowedMethods.ALLOW_GET_HEAD,
                # Keys are unguessable and never rewritten: cache for as long as CloudFront will.
                cache_policy=cloudfront.CachePolicy.CACHING_OPTIMIZED,
                compress=True,
            ),
            price_class=cloudfront.PriceClass.PRICE_CLASS_100,
            http_version=cloudfront.HttpVersion.HTTP2_AND_3,
        )
        # The sidecars (sdgate.storage.sidecar_key) hold the prompts: an image URL may be shared, its prompt
        # may not. Origin Access Control lets the distribution read every object of the bucket; a Deny beats
        # any Allow, so this keeps CloudFront off the private prefix, and off any .json such as the sidecars
        # stored beside their images by earlier versions (a sidecar URL answers 403, as a missing key does).
        # One statement in the bucket policy, rather than a second cache behavior that would need an origin
        # of its own; the worker still writes and deletes there.
        bucket.add_to_resource_policy(
            iam.PolicyStatement(
                effect=iam.Effect.DENY,
                principals=[iam.ServicePrincipal("cloudfront.amazonaws.com")],
                actions=["s3:GetObject"],
                resources=[
                    bucket.arn_for_objects(f"{IMAGES_PREFIX}/{PRIVATE_PREFIX}*"),
                    bucket.arn_for_objects(f"{IMAGES_PREFIX}/*.json"),
                ],
            )
        )

        # 2. job records: a table with the store's own key schema and indexes, TTL on expires_at
        table = dynamodb.Table(
            self,
            "Jobs",
            partition_key=dynamodb.Attribute(name="id", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute=TTL_ATTRIBUTE,
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            removal_policy=RemovalPolicy.RETAIN,
        )
        for index, partition in INDEXES:
            table.add_global_secondary_index(
                index_name=index,
                partition_key=dynamodb.Attribute(name=partition, type=dynamodb.AttributeType.STRING),
                sort_key=dynamodb.Attribute(name="created", type=dynamodb.AttributeType.NUMBER),
                projection_type=dynamodb.ProjectionType.ALL,
            )

        # 3. the model: an existing endpoint, or one made from the sdgate image; autoscaled when asked
        endpoint = self._endpoint(config, endpoint_name) if config.image_uri else None
        if config.max_instances is not None:
            self._autoscaling(config, endpoint_name, endpoint)
        endpoint_arn = self.format_arn(
            service="sagemaker", resource="endpoint", resource_name=endpoint_name.lower()
        )  # SageMaker's ARNs spell endpoint names in lower case

        # 4. the functions: one code package, two roles
        code = lambda_code(config.architecture)
        architecture = lambda_.Architecture.ARM_64 if config.architecture == "arm64" else lambda_.Architecture.X86_64
        environment = {
            "SDGATE_BACKEND": "sagemaker",
            "SDGATE_SAGEMAKER_ENDPOINT": endpoint_name,
            "SDGATE_STORAGE": "s3",
            "SDGATE_S3_BUCKET": bucket.bucket_name,
            "SDGATE_S3_PREFIX": IMAGES_PREFIX,
            "SDGATE_PUBLIC_BASE_URL": f"https://{distribution.distribution_domain_name}",
            "SDGATE_JOB_STORE": "dynamodb",
            "SDGATE_DYNAMODB_TABLE": table.table_name,
            "SDGATE_RETENTION": f"{config.retention_days}d",
            "SDGATE_WORKER_TIMEOUT_S": str(WORKER_MAX_EVENT_AGE_S + WORKER_TIMEOUT_S),
            "SDGATE_DATA_DIR": "/tmp/sdgate",  # the only writable place; holds nothing that must last
            "SDGATE_AUTH": "off",  # API Gateway checks the API keys
            "SDGATE_LOG_FORMAT": "json",
        }
        worker = self._function(
            "WorkerFunction",
            code,
            architecture,
            environment,
            memory_mb=1024,
            timeout_s=WORKER_TIMEOUT_S,
            description="sdgate worker: runs one job (SageMaker endpoint, S3, job record, webhook)",
        )
        worker.configure_async_invoke(
            # No retry: a retried generation is a second one to pay for; its job fails visibly instead.
            retry_attempts=0,
            max_event_age=Duration.seconds(WORKER_MAX_EVENT_AGE_S),
        )
        if config.worker_concurrency:
            # Set through the CfnFunction: the L2 property is fixed at construction.
            cfn_worker = worker.node.default_child
            assert isinstance(cfn_worker, lambda_.CfnFunction)
            cfn_worker.reserved_concurrent_executions = config.worker_concurrency
        api_function = self._function(
            "ApiFunction",
            code,
            architecture,
            {**environment, "SDGATE_WORKER_FUNCTION": worker.function_name},
            memory_mb=1024,  # more memory is more CPU: a faster cold start
            timeout_s=API_TIMEOUT_S,
            description="sdgate API: validates, records jobs, hands them to the worker, answers",
        )

        # 5. least privilege, spelled out
        data_actions = ["dynamodb:GetItem", "dynamodb:PutItem"]
        worker.add_to_role_policy(iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint"], resources=[endpoint_arn]))
        worker.add_to_role_policy(
            iam.PolicyStatement(
                # Put: images and sidecars. Delete: the images of a job canceled while it ran.
                actions=["s3:PutObject", "s3:DeleteObject"],
                resources=[bucket.arn_for_objects(f"{IMAGES_PREFIX}/*")],
            )
        )
        # Get: the input images of image-to-image and inpainting jobs, which the API stored.
        inputs = bucket.arn_for_objects(f"{IMAGES_PREFIX}/{PRIVATE_PREFIX}*")
        worker.add_to_role_policy(iam.PolicyStatement(actions=["s3:GetObject"], resources=[inputs]))
        worker.add_to_role_policy(iam.PolicyStatement(actions=data_actions, resources=[table.table_arn]))
        api_function.add_to_role_policy(
            iam.PolicyStatement(actions=[*data_actions, "dynamodb:Query"], resources=[table.table_arn])
        )
        api_function.add_to_role_policy(
            # A request's input images, under the private prefix before its job is handed over (Delete: a
            # request refused after they were stored).
            iam.PolicyStatement(actions=["s3:PutObject", "s3:DeleteObject"], resources=[inputs])
        )
        api_function.add_to_role_policy(
            iam.PolicyStatement(actions=["dynamodb:Query"], resources=[f"{table.table_arn}/index/*"])
        )
        api_function.add_to_role_policy(
            iam.PolicyStatement(actions=["lambda:InvokeFunction"], resources=[worker.function_arn])
        )

        # 6. the API: the original routes and the native v1 API, keys and throttling
        api = apigw.RestApi(
            self,
            "Api",
            rest_api_name=f"sdgate-{config.stage}",
            description="sdgate: Stable Diffusion behind an open HTTP API",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            # Images come from CloudFront; any image the API answers with must pass through unchanged.
            binary_media_types=["image/*"],
            cloud_watch_role=False,
            deploy_options=apigw.StageOptions(
                stage_name=config.stage,
                throttling_rate_limit=config.rate_limit,
                throttling_burst_limit=config.burst_limit,
                metrics_enabled=True,
            ),
            default_method_options=apigw.MethodOptions(api_key_required=config.api_key),
        )
        integration = apigw.LambdaIntegration(api_function, timeout=Duration.seconds(API_TIMEOUT_S))
        text2image = api.root.add_resource("text2image")
        text2image.add_method("POST", integration)
        text2image.add_method("GET", integration)
        api.root.add_resource("v1").add_resource("{proxy+}").add_method("ANY", integration)
        key_header = ""
        if config.api_key:
            key = api.add_api_key("ApiKey", api_key_name=f"sdgate-{config.stage}")
            plan = api.add_usage_plan(
                "UsagePlan",
                name=f"sdgate-{config.stage}",
                throttle=apigw.ThrottleSettings(rate_limit=config.rate_limit, burst_limit=config.burst_limit),
                quota=apigw.QuotaSettings(limit=config.quota_per_day, period=apigw.Period.DAY)
                if config.quota_per_day
                else None,
            )
            plan.add_api_stage(stage=api.deployment_stage)
            plan.add_api_key(key)
            key_header = ' -H "x-api-key: $SDGATE_API_KEY"'
            CfnOutput(
                self,
                "ApiKeyCommand",
                description="Prints the API key",
                value=f"aws apigateway get-api-key --api-key {key.key_id} --include-value --query value --output text",
            )

        # 7. what a user needs next
        CfnOutput(self, "ApiUrl", value=api.url)
        CfnOutput(
            self,
            "CurlCommand",
            value=f"curl -s {api.url}text2image -H 'content-type: application/json'{key_header} "
            """-d '{"text": "astronaut on a horse"}'""",
        )
        CfnOutput(self, "CloudFrontDomain", value=distribution.distribution_domain_name)
        CfnOutput(self, "BucketName", value=bucket.bucket_name)
        CfnOutput(self, "JobsTable", value=table.table_name)
        CfnOutput(self, "EndpointName", value=endpoint_name)

    def _function(
        self,
        name: str,
        code: lambda_.Code,
        architecture: lambda_.Architecture,
        environment: dict[str, str],
        *,
        memory_mb: int,
        timeout_s: int,
        description: str,
    ) -> lambda_.Function:
        # Its own role and log group: no managed policy with logs:* on every log group.
        log_group = logs.LogGroup(
            self, f"{name}Logs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
        )
        role = iam.Role(self, f"{name}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[f"{log_group.log_group_arn}"]
            )
        )
        return lambda_.Function(
            self,
            name,
            runtime=RUNTIME,
            architecture=architecture,
            handler=HANDLER,
            code=code,
            memory_size=memory_mb,
            timeout=Duration.seconds(timeout_s),
            environment=environment,
            role=role,
            log_group=log_group,
            description=description,
        )

    def _autoscaling(self, config: StackConfig, endpoint_name: str, endpoint: Any | None) -> None:
        """Application Auto Scaling on the variant's instance count, tracking invocations per instance.

        Out fast (a minute), in slowly (five): an instance takes minutes to start and load its model,
        so letting one go at the first quiet minute would make the next burst wait for it.
        """
        floor = config.min_instances if config.min_instances is not None else config.instance_count
        target = appscaling.ScalableTarget(
            self,
            "EndpointScaling",
            service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
            resource_id=f"endpoint/{endpoint_name}/variant/{config.variant_name}",
            scalable_dimension="sagemaker:variant:DesiredInstanceCount",
            min_capacity=floor,
            max_capacity=config.max_instances,
        )
        if endpoint is not None:
            target.node.add_dependency(endpoint)  # the variant must exist before it is registered
        target.scale_to_track_metric(
            "InvocationsPerInstance",
            target_value=config.invocations_per_instance,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_out_cooldown=Duration.seconds(60),
            scale_in_cooldown=Duration.seconds(300),
        )

    def _endpoint(self, config: StackConfig, endpoint_name: str) -> Any:
        """The SageMaker model, endpoint config and endpoint, from the sdgate container image."""
        assert config.image_uri
        role = iam.Role(self, "ModelRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"))
        ecr = _ECR_IMAGE.match(config.image_uri)
        if ecr:
            account, region, repository = ecr.groups()
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
                    resources=[f"arn:{self.partition}:ecr:{region}:{account}:repository/{repository}"],
                )
            )
            # GetAuthorizationToken is account-wide: IAM accepts no narrower resource for it.
            role.add_to_policy(iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]))
        log_group = f"arn:{self.partition}:logs:{self.region}:{self.account}:log-group:/aws/sagemaker/Endpoints/"
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[f"{log_group}{endpoint_name}", f"{log_group}{endpoint_name}:*"],
            )
        )
        if config.model_data_url:
            bucket_and_key = config.model_data_url.removeprefix("s3://")
            role.add_to_policy(
                iam.PolicyStatement(actions=["s3:GetObject"], resources=[f"arn:{self.partition}:s3:::{bucket_and_key}"])
            )
        model = sagemaker.CfnModel(
            self,
            "Model",
            execution_role_arn=role.role_arn,
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=config.image_uri,
                model_data_url=config.model_data_url,
                environment={"SDGATE_MODEL": config.model},
            ),
        )
        model.node.add_dependency(role)  # the role's policy must exist before SageMaker pulls the image
        endpoint_config = sagemaker.CfnEndpointConfig(
            self,
            "EndpointConfig",
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=config.variant_name,
                    model_name=model.attr_model_name,
                    initial_instance_count=config.instance_count,
                    instance_type=config.instance_type,
                    initial_variant_weight=1.0,
                    # A model from the hub downloads at start: give it time before the health check fails it.
                    container_startup_health_check_timeout_in_seconds=900,
                )
            ],
        )
        return sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=endpoint_name,
            endpoint_config_name=endpoint_config.attr_endpoint_config_name,
        )


# -- the Lambda package -----------------------------------------------------------------------------


def lambda_requirements() -> list[str]:
    """sdgate's own requirements and its aws extra, as the package needs them: no server, no model libraries."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["aws"]]
    # uvicorn serves HTTP for `sdgate serve`; on Lambda, API Gateway and Mangum do.
    return [r for r in wanted if not r.startswith("uvicorn")]


def _package_hash(architecture: str) -> str:
    digest = hashlib.sha256(f"{RUNTIME.name}/{architecture}".encode())
    for path in sorted([REPO / "pyproject.toml", *(REPO / "src" / "sdgate").rglob("*.py")]):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@jsii.implements(ILocalBundling)
class PipBundler:
    """Builds the package with this machine's pip (wheels for Lambda's platform): no Docker needed."""

    def __init__(self, architecture: str):
        machine = "aarch64" if architecture == "arm64" else "x86_64"
        # Lambda's Python 3.12 runs on Amazon Linux 2023 (glibc 2.34): both wheel generations fit.
        self.platforms = [f"manylinux2014_{machine}", f"manylinux_2_28_{machine}"]

    def try_bundle(self, output_dir: str, options: Any = None) -> bool:
        version = RUNTIME.name.removeprefix("python")
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            output_dir,
            *(arg for platform in self.platforms for arg in ("--platform", platform)),
            "--implementation",
            "cp",
            "--python-version",
            version,
            "--only-binary=:all:",
            *lambda_requirements(),
        ]
        if subprocess.run(command, check=False).returncode != 0:
            return False  # CDK then bundles in Docker
        copy_sources(Path(output_dir))
        return True


def copy_sources(output: Path) -> None:
    """sdgate's own modules into the package (no model weights: the gateway loads none)."""
    shutil.copytree(
        REPO / "src" / "sdgate",
        output / "sdgate",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models"),
        dirs_exist_ok=True,
    )


def lambda_code(architecture: str) -> lambda_.Code:
    """The package of both functions, built at synth time: by pip here, or in Lambda's build image."""
    requirements = " ".join(f"'{r}'" for r in lambda_requirements())
    return lambda_.Code.from_asset(
        str(REPO),
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=_package_hash(architecture),
        bundling=BundlingOptions(
            image=DockerImage.from_registry(f"public.ecr.aws/sam/build-{RUNTIME.name}:latest"),
            platform="linux/arm64" if architecture == "arm64" else "linux/amd64",
            command=[
                "bash",
                "-c",
                f"pip install --no-cache-dir --target /asset-output {requirements} && "
                "cp -r /asset-input/src/sdgate /asset-output/ && rm -rf /asset-output/sdgate/models "
                "&& find /asset-output/sdgate -name __pycache__ -prune -exec rm -rf {} +",
            ],
            # jsii calls try_bundle(output_dir, options) with the options as one struct, not as the
            # keywords the typing stub names: the runtime's shape wins over the stub's.
            local=PipBundler(architecture),
        ),
    )
