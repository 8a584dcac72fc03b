#!/usr/bin/env bash
# Does `zoo serve` (HTTP workers + inference process) come up on this machine? 40 s at most; its log.
d=$(mktemp -d) && cp -r "$1"/. "$d"/
ZOO_DATA_DIR="$d" python3 -m service.cli serve --port 8123 > "${OUT:-/tmp}/serve.log" 2>&1 &
pid=$!
ok=1
for _ in $(seq 40); do
  python3 -c 'import httpx,sys; sys.exit(httpx.get("http://127.0.0.1:8123/readyz").status_code != 200)' 2>/dev/null && { ok=0; break; }
  sleep 1
done
kill $pid; sleep 2; pkill -f "service.cli serve"; pkill -f service.infer
df -h /dev/shm; tail -25 "${OUT:-/tmp}/serve.log"
echo "serve ready: $([ $ok = 0 ] && echo yes || echo no)"
exit $ok
