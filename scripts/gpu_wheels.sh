#!/usr/bin/env bash
# Wheels that the GPU machines of the `device` tool lack (they cannot reach a registry) for
# benchmarks/gpu_session.sh: SAELens and sparsify with what they import beyond that machine's image
# (PyTorch, Triton, transformers, datasets' own deps... are there). Run here, once; .whl/ is ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  sae-lens==6.54.12 eai-sparsify==1.3.3 transformer-lens==3.9.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
  annotated-types==0.8.0 babe==0.0.7 beartype==0.23.1 better-abc==0.0.3 config2py==0.1.76 cwevals==0.0.1b1 \
  datasets==5.2.0 defusedxml==0.7.1 dill==0.4.1 distro==1.9.0 docstring-parser==0.18.0 dol==0.3.100 \
  fancy-einsum==0.0.3 graze==0.1.46 i2==0.1.91 importlib-resources==7.1.0 multiprocess==0.70.19 natsort==8.4.0 \
  platformdirs==4.14.7 pydantic==2.14.3 pydantic-core==2.50.4 python-dotenv==1.2.4 schedulefree==1.4.1 \
  simple-parsing==0.1.9 sniffio==1.3.1 tenacity==9.2.1 typeguard==4.6.0 typing-inspection==0.4.5 \
  wandb==0.31.0 googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
du -sh .whl
