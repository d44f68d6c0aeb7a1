#!/usr/bin/env bash
# Installs the Debian packages a step needs, only when missing. Runs as root (or via sudo).
#   test:  etcd, dnsmasq, prometheus/promtool  (real registries and a real Prometheus in tests),
#          thrift-compiler                      (tests generate a Thrift service's Python code),
#          chromium                             (the dashboard page, tested in a real browser)
#   bench: wrk, haproxy, nginx, taskset, h2load (load generators and the comparison proxies;
#          h2load, from nghttp2-client, drives the gRPC row)
set -euo pipefail
case "${1:-test}" in
  test)  want=(etcd-server:etcd dnsmasq-base:dnsmasq prometheus:promtool wrk:wrk haproxy:haproxy
               thrift-compiler:thrift chromium:chromium) ;;
  bench) want=(wrk:wrk haproxy:haproxy nginx-light:nginx util-linux:taskset nghttp2-client:h2load) ;;
  *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac
missing=()
for pair in "${want[@]}"; do
  pkg=${pair%%:*}; bin=${pair##*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts services it installs; tests start their own on free ports instead.
for svc in etcd prometheus nginx haproxy prometheus-node-exporter; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
  fi
done
