# syntax=docker/dockerfile:1
# The operator image. Multi-stage: wheels are built in the first stage, the final
# stage has only the installed packages and runs as a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY runtime_image/ runtime_image/
COPY operator/ operator/
RUN python -m build --wheel --outdir /wheels runtime_image \
 && python -m build --wheel --outdir /wheels operator

FROM ${PYTHON_IMAGE}
# The operator needs only the runtime's light spec/config modules: no extras.
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin relayrl
USER 10001
ENTRYPOINT ["relayrl-operator"]
CMD ["run"]
