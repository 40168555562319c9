#!/usr/bin/env bash
# Start the local Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) when they are down.
# The integration tests of the service use them; the science tests do not.
set -uo pipefail

if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 ||
      redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null 2>&1 || true
  fi
fi
if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
  fi
fi
for _ in $(seq 1 20); do
  redis_ok=1; pg_ok=1
  command -v redis-cli >/dev/null && { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis_ok=0; }
  command -v pg_isready >/dev/null && { pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 || pg_ok=0; }
  [ "$redis_ok" = 1 ] && [ "$pg_ok" = 1 ] && exit 0
  sleep 0.5
done
echo "warning: Redis or PostgreSQL is not reachable on 127.0.0.1; service tests will fail" >&2
exit 0
