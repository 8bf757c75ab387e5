#!/usr/bin/env bash
# Run tests (by default the end-to-end cluster test) with the root filesystem read-only, as in the
# hardened KubeRay pods: only /tmp, /dev/shm and $HOME/.cache are writable, each a fresh tmpfs (the
# pods' emptyDirs). Any write elsewhere by Ray, clipray or a library fails, and shows up as a
# failing test or an EROFS line in a log.
#
#   sudo infra/check_readonly_root.sh [PYTEST ARGS ...]     (default: tests/test_infra_cluster.py)
#
# Needs root (a private mount namespace: `unshare -m`; nothing changes outside it) and the venv
# (`make install`). Prints where the run wrote and the read-only errors found in the logs; exits
# non-zero when pytest fails or an error was found. The fresh /tmp hides other processes' files
# and the Ray clusters they left there from this run only.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EROFS_PATTERN='read-only file system\|EROFS\|not a writable directory\|Errno 30'

if [[ -z "${_CLIPRAY_READONLY_NS:-}" ]]; then
  [[ "$(id -u)" -eq 0 ]] || { echo "infra/check_readonly_root.sh: needs root (unshare -m)" >&2; exit 2; }
  [[ -x "$REPO_ROOT/.venv/bin/python" ]] || { echo "infra/check_readonly_root.sh: no .venv: run make install" >&2; exit 2; }
  out="$(mktemp -d /tmp/clipray-readonly-XXXXXX)"
  status=0
  _CLIPRAY_READONLY_NS=1 _CLIPRAY_OUT="$out" unshare -m --propagation private "$0" "$@" || status=$?
  echo "--- written under the writable mounts (2 levels):"; cat "$out/written.txt"
  if [[ -s "$out/erofs.txt" ]]; then
    echo "--- read-only filesystem errors in the logs:"; cat "$out/erofs.txt"
    [[ "$status" -ne 0 ]] || status=1
  fi
  echo "--- pytest (log: $out/pytest.log): exit $(cat "$out/pytest.rc" 2>/dev/null || echo 'none: setup failed')"
  exit "$status"
fi

# In the private mount namespace. $_CLIPRAY_OUT stays writable through a bind mount on /srv.
cache="${HOME:?}/.cache"
mkdir -p "$cache"
mount --bind "$_CLIPRAY_OUT" /srv
mount -o remount,bind,ro /
mount -t tmpfs -o size=16g tmpfs /tmp
mount -t tmpfs -o size=24g tmpfs /dev/shm
mount -t tmpfs -o size=4g tmpfs "$cache"
if touch /.clipray-probe 2>/dev/null; then echo "infra/check_readonly_root.sh: / is still writable" >&2; exit 2; fi

# Ray deletes its session dirs when the cluster stops: read the logs while the tests run.
( set +e; while true; do grep -rIh -i "$EROFS_PATTERN" /tmp "$cache" 2>/dev/null | cut -c1-400 >> /srv/erofs-raw.txt; sleep 5; done ) &
watcher=$!

cd "$REPO_ROOT"
# The image's cache variables (infra/docker/Dockerfile), here under $HOME/.cache.
export NO_ALBUMENTATIONS_UPDATE=1 MPLCONFIGDIR="$cache/matplotlib" TRITON_CACHE_DIR="$cache/triton" CUDA_CACHE_PATH="$cache/nv"
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider "${@:-tests/test_infra_cluster.py}" > /srv/pytest.log 2>&1 || rc=$?
echo "$rc" > /srv/pytest.rc
sleep 6
kill "$watcher" 2>/dev/null || true
grep -rIh -i "$EROFS_PATTERN" /tmp "$cache" 2>/dev/null | cut -c1-400 >> /srv/erofs-raw.txt || true
sort -u /srv/erofs-raw.txt > /srv/erofs.txt
find /tmp "$cache" -mindepth 1 -maxdepth 2 | sort > /srv/written.txt
exit "$rc"
