"""sdgate on AWS Lambda: the handler (:mod:`sdgate.aws.lambda_handler`) and its job runner.

The CDK app that deploys it (API Gateway, Lambda, DynamoDB, S3, CloudFront, the SageMaker
endpoint) lives in ``deploy/aws`` of the repository.
"""
