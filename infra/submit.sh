#!/usr/bin/env bash
# Submit a clipray stage to a running Ray cluster with `ray job submit`.
#
#   infra/submit.sh [options] COMMAND [--config FILE.yaml] [--set key=value ...]
#
# COMMAND is pipeline, train, tune or eval; it runs `python -m pipeline|training|training.tune|
# evaluation` on the cluster with the arguments that follow. The repository is uploaded as the
# job's working dir (what .rayignore leaves out stays home: .venv, .git, data, run outputs), so the
# cluster runs this checkout's code; the cluster's nodes need clipray's dependencies installed
# (the Docker image in infra/docker has them). A local --config must lie inside the repository.
#
# Options:
#   --address URL        the cluster's job server (dashboard), e.g. http://127.0.0.1:8265;
#                        default: $RAY_ADDRESS
#   --env NAME[=VALUE]   set NAME in the job's environment (VALUE default: this shell's $NAME);
#                        repeatable. Runtime-env values are visible in the Ray dashboard: pass
#                        endpoints and regions this way, never credentials (the nodes hold those).
#   --submission-id ID   a job id of your own (default: Ray picks one)
#   --no-wait            return once submitted instead of following the logs
#   --dry-run            print the `ray job submit` command and exit
#   -h, --help           this help
#
# Exit status: ray job submit's (non-zero when the job fails); 2 for bad arguments.
# Token-authenticated clusters (KubeRay authOptions, RAY_AUTH_MODE=token): export RAY_AUTH_MODE=token
# and RAY_AUTH_TOKEN (or keep the token in ~/.ray/auth_token) before running this script.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "infra/submit.sh: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_ADDRESS:-}"
submission_id=""
wait_flag=()
dry_run=0
env_pairs=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) [[ $# -ge 2 ]] || die "--address needs a URL"; address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --env)
      [[ $# -ge 2 ]] || die "--env needs NAME or NAME=VALUE"
      env_pairs+=("$2"); shift 2 ;;
    --env=*) env_pairs+=("${1#*=}"); shift ;;
    --submission-id) [[ $# -ge 2 ]] || die "--submission-id needs an id"; submission_id="$2"; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

[[ $# -ge 1 ]] || die "missing COMMAND: pipeline, train, tune or eval (see --help)"
command="$1"; shift
case "$command" in
  pipeline) module=pipeline ;;
  train) module=training ;;
  tune) module=training.tune ;;
  eval) module=evaluation ;;
  *) die "unknown COMMAND '$command': expected pipeline, train, tune or eval" ;;
esac

[[ -n "$address" ]] || die "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS"

# The config travels with the working dir, so a local one must be a file inside the repository;
# it is passed on relative to the repository root (the job's working dir). Relative paths are
# read from the current directory, as any command-line tool does.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --config|-c) value_at=$((i + 1)); config="${args[$value_at]:-}" ;;
    --config=*) value_at=$i; config="${args[$i]#*=}" ;;
    *) continue ;;
  esac
  [[ -n "$config" ]] || die "--config needs a file"
  [[ "$config" == *://* ]] && continue  # s3://, gs://, ...: the job reads it itself
  rel="$(python3 - "$REPO_ROOT" "$config" <<'PY'
import os, sys
root, config = os.path.realpath(sys.argv[1]), sys.argv[2]
path = os.path.realpath(config)
if os.path.commonpath([root, path]) != root:
    sys.exit(f"infra/submit.sh: --config {config} is outside the repository; "
             f"the job only sees files under {root} "
             "(or pass an s3:// URL)")
if not os.path.isfile(path):
    sys.exit(f"infra/submit.sh: --config {config}: no such file ({path})")
print(os.path.relpath(path, root))
PY
)" || exit 2
  if [[ $value_at -eq $i ]]; then args[i]="--config=$rel"; else args[value_at]="$rel"; fi
done

# The job's environment (runtime_env.env_vars) as JSON; NAME alone takes this shell's value.
runtime_env="$(python3 - NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 \
  "${env_pairs[@]+"${env_pairs[@]}"}" <<'PY'
import json, os, re, sys
env = {}
for pair in sys.argv[1:]:
    name, sep, value = pair.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        sys.exit(f"infra/submit.sh: --env {pair}: {name!r} is not a variable name")
    if not sep:
        if name not in os.environ:
            sys.exit(f"infra/submit.sh: --env {name}: ${name} is not set (exported) in this shell")
        value = os.environ[name]
    env[name] = value
print(json.dumps({"env_vars": env}, sort_keys=True))
PY
)" || exit 2

submit=(ray job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env")
[[ -n "$submission_id" ]] && submit+=(--submission-id "$submission_id")
submit+=("${wait_flag[@]+"${wait_flag[@]}"}" -- python -m "$module" "${args[@]+"${args[@]}"}")

cd "$REPO_ROOT"
if [[ "$dry_run" -eq 1 ]]; then
  printf '%q ' "${submit[@]}"; echo
  exit 0
fi
exec "${submit[@]}"
