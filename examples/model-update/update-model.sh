#!/bin/sh
# Push model version VERSION to the registry and wait until the Agent runs it.
#
#   ./update-model.sh VERSION [MODEL_DIR]
#
# MODEL_DIR is a model directory (model file + relayrl-model.json) whose metadata
# says VERSION; without one, a fresh CartPole MLP of that version is exported, which
# is enough to watch the version change. Settings come from the environment:
#   NATS_URL   the NATS server holding the registry (kubectl port-forward it if it runs
#              in the cluster)              default nats://127.0.0.1:4222
#   BUCKET     the registry bucket          default relayrl-models
#   MODEL      the model's name in it       default cartpole
#   AGENT      the Agent to watch           default cartpole-live
#   NAMESPACE  its namespace                default: kubectl's current one
#   KUBECTL    the kubectl to use           default kubectl
#   TIMEOUT    how long to wait             default 120s
set -eu

version=${1:?usage: update-model.sh VERSION [MODEL_DIR]}
model_dir=${2:-}
kubectl=${KUBECTL:-kubectl}
agent=${AGENT:-cartpole-live}
set -- # kubectl namespace flag, when one is given
if [ -n "${NAMESPACE:-}" ]; then set -- --namespace "$NAMESPACE"; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "$model_dir" ]; then
    model_dir=$work/model
    relayrl-runtime model export "$model_dir" --version "$version" --seed "$version"
fi
relayrl-runtime model push "$model_dir" \
    --nats "${NATS_URL:-nats://127.0.0.1:4222}" \
    --bucket "${BUCKET:-relayrl-models}" \
    --name "${MODEL:-cartpole}"

echo "waiting for agent/$agent to run model version $version"
"$kubectl" "$@" wait "agent/$agent" \
    --for="jsonpath={.status.modelVersion}=$version" --timeout="${TIMEOUT:-120s}"
"$kubectl" "$@" get agent "$agent"
