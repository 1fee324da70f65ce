# The SageMaker inference container: sdgate as the model endpoint (GET /ping, POST /invocations on 8080).
#   docker build -t sdgate .
#   docker run --gpus all -p 8080:8080 -e SDGATE_MODEL=stabilityai/stable-diffusion-2-1-base sdgate serve
# SageMaker runs it as `docker run IMAGE serve` with the model archive unpacked in /opt/ml/model.
FROM pytorch/pytorch:2.4.1-cuda12.1-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # /opt/ml/model is read-only: job records, the built-in model and downloads go here.
    SDGATE_DATA_DIR=/var/lib/sdgate \
    HF_HOME=/var/lib/sdgate/huggingface

WORKDIR /opt/sdgate
# The base image brings torch with CUDA; installing the engine extra keeps it (torch>=2.1 is satisfied).
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[engine,aws]" && rm -rf /root/.cache

COPY docker/serve /usr/local/bin/serve
RUN chmod 0755 /usr/local/bin/serve && mkdir -p /var/lib/sdgate

EXPOSE 8080
CMD ["serve"]
