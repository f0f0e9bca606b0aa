#!/usr/bin/env bash
# Benchmarks the HTTP binary-cache endpoint of `nixmesh agent` against nginx
# serving the same NARs as static files (what `nix copy --to file://` wrote),
# side by side in one run. Both servers run at once on 127.0.0.1; every
# measurement is taken for both, alternating which goes first, so machine
# noise hits both alike. Reports medians over ROUNDS and nixmesh/nginx ratios,
# then nixmesh's peak RSS for a small and a large NAR. The tree's NAR is
# served from the agent's kept copy once it went out whole twice (the byte
# check below and the first request); NAR_CACHE_MIB=0 measures encoding it
# from the store every time.
#
# Needs: root (nginx runs as root from a temp dir), nix-store and nix (2.8),
# nginx, wrk, curl, cargo (unless NIXMESH is given).
# Everything lives in one mktemp dir that is removed at exit (KEEP=1 keeps it).
#
#   bench/http_cache.sh                     # defaults below
#   BIG_MIB=64 ROUNDS=2 DURATION=2 RSS_BIG_MIB=0 bench/http_cache.sh   # quick
set -euo pipefail

BIG_MIB=${BIG_MIB:-256}          # the large file's size
SMALL_FILES=${SMALL_FILES:-2000} # files in the small-file tree, 1-16 KiB each
ROUNDS=${ROUNDS:-5}              # repetitions per measurement; medians reported
DURATION=${DURATION:-5}          # seconds per wrk run
CONNS=${CONNS:-16}               # connections for the parallel rows
THREADS=${THREADS:-2}            # wrk threads for the parallel rows
RSS_BIG_MIB=${RSS_BIG_MIB:-1024} # second NAR size for the RSS check; 0 skips
KEEP=${KEEP:-0}                  # 1: keep the temp dir for inspection
NIXMESH=${NIXMESH:-}             # a nixmesh binary; empty: cargo build --release
RESULTS=${RESULTS:-}             # a file to copy the raw per-run numbers (TSV) to
NAR_CACHE_MIB=${NAR_CACHE_MIB:-} # share.nar_cache_mib for the agent; empty: its default

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
lua="$here/wrk_report.lua"
nix_x=(--extra-experimental-features nix-command)

for tool in nix-store nix nginx wrk curl; do
    command -v "$tool" >/dev/null || { echo "bench: needs $tool" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "bench: run as root (nginx workers run as root)" >&2; exit 1; }

if [[ -z $NIXMESH ]]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/bench-target}
    echo "== building nixmesh (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$repo" && cargo build --release --quiet)
    NIXMESH=$CARGO_TARGET_DIR/release/nixmesh
    built_from=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo "$repo")
else
    built_from="given binary"
fi

work=$(mktemp -d /tmp/nixmesh-bench.XXXXXX)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then
        echo "bench: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        [[ -z $(ss -Hltn "sport = :$p") ]] && { echo "$p"; return; }
    done
}

wait_http() {
    local i
    for i in $(seq 100); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "bench: $1 never answered" >&2
    return 1
}

# The process and its children (nginx: master and workers).
proc_tree() {
    echo "$1"
    cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . || true
}

# utime + stime of a process tree, in clock ticks.
cpu_ticks() {
    local total=0 pid stat
    for pid in $(proc_tree "$1"); do
        stat=$(cat /proc/"$pid"/stat 2>/dev/null) || continue
        stat=${stat##*) }
        # shellcheck disable=SC2086 # split the fields on purpose
        set -- $stat
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

# Peak RSS (VmHWM, KiB) of a process tree, summed.
peak_rss_kib() {
    local total=0 pid kib
    for pid in $(proc_tree "$1"); do
        kib=$(awk '/^VmHWM:/ {print $2}' /proc/"$pid"/status 2>/dev/null || echo 0)
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# The URL line of a server's narinfo for a store path.
nar_url_of() {
    local base=$1 path=$2 hash
    hash=$(basename "$path" | cut -d- -f1)
    curl -sf "$base/$hash.narinfo" | sed -n 's/^URL: //p'
}

# Only the HTTP cache: no mesh (so no mDNS or QUIC), no substituter; the
# admin API cannot be turned off, so it gets its own loopback port.
start_agent() { # port log -> pid in $agent_pid
    local port=$1 log=$2 admin_port
    admin_port=$(free_port)
    while [[ $admin_port == "$port" ]]; do admin_port=$(free_port); done
    cat >"$work/agent-$port.toml" <<EOF
state_dir = "$work/state"

[store]
root = "$work/store"
nix_conf = "$work/nix.conf"

[share]
all = true
trusted_keys = []
${NAR_CACHE_MIB:+nar_cache_mib = $NAR_CACHE_MIB}

[http_cache]
enable = true
listen = "127.0.0.1:$port"

[mesh]
enable = false
mdns = false

[substituter]
enable = false

[admin]
listen = "127.0.0.1:$admin_port"
EOF
    "$NIXMESH" check-config --config "$work/agent-$port.toml"
    "$NIXMESH" agent --config "$work/agent-$port.toml" 2>"$log" &
    agent_pid=$!
    pids+=("$agent_pid")
    wait_http "http://127.0.0.1:$port/nix-cache-info" || { cat "$log" >&2; return 1; }
}

stop_agent() {
    local keep=() pid
    kill "$1"
    wait "$1" 2>/dev/null || true
    for pid in "${pids[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
    pids=("${keep[@]}")
}

# ---------------------------------------------------------------- the store

echo "== making a chroot store in $work/store"
mkdir -p "$work/in/tree" "$work/state"
head -c "$((BIG_MIB * 1024 * 1024))" /dev/urandom >"$work/in/big-$BIG_MIB-MiB.bin"
RANDOM=42
for i in $(seq 0 $((SMALL_FILES - 1))); do
    d="$work/in/tree/d$((i % 16))/e$((i % 7))"
    [[ $i -lt 112 ]] && mkdir -p "$d"
    head -c $((1024 + RANDOM % 15361)) /dev/urandom >"$d/f$i"
done
big_path=$(nix-store --store "$work/store" --add "$work/in/big-$BIG_MIB-MiB.bin")
tree_path=$(nix-store --store "$work/store" --add "$work/in/tree")
huge_path=
if [[ $RSS_BIG_MIB -gt 0 ]]; then
    head -c "$((RSS_BIG_MIB * 1024 * 1024))" /dev/urandom >"$work/in/huge-$RSS_BIG_MIB-MiB.bin"
    huge_path=$(nix-store --store "$work/store" --add "$work/in/huge-$RSS_BIG_MIB-MiB.bin")
fi
rm -rf "$work/in"

echo "== exporting with nix copy (compression=none)"
nix "${nix_x[@]}" copy --store "$work/store" --to "file://$work/export?compression=none" \
    "$big_path" "$tree_path" 2>"$work/nix-copy.log" || { cat "$work/nix-copy.log" >&2; exit 1; }

# ---------------------------------------------------------------- the servers

nginx_port=$(free_port)
mkdir -p "$work/nginx/tmp"
cat >"$work/nginx/nginx.conf" <<EOF
user root;
worker_processes auto;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    log_not_found off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path $work/nginx/tmp/body;
    proxy_temp_path $work/nginx/tmp/proxy;
    fastcgi_temp_path $work/nginx/tmp/fastcgi;
    uwsgi_temp_path $work/nginx/tmp/uwsgi;
    scgi_temp_path $work/nginx/tmp/scgi;
    types {
        text/x-nix-narinfo narinfo;
        text/x-nix-cache-info nix-cache-info;
        application/x-nix-nar nar;
    }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$nginx_port;
        root $work/export;
    }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
nginx_pid=$!
pids+=("$nginx_pid")
wait_http "http://127.0.0.1:$nginx_port/nix-cache-info"

mesh_port=$(free_port)
while [[ $mesh_port == "$nginx_port" ]]; do mesh_port=$(free_port); done
start_agent "$mesh_port" "$work/agent.log"
mesh_pid=$agent_pid

declare -A base=(
    [nginx]="http://127.0.0.1:$nginx_port"
    [nixmesh]="http://127.0.0.1:$mesh_port"
)
declare -A pid_of=([nginx]=$nginx_pid [nixmesh]=$mesh_pid)
declare -A url
missing=00000000000000000000000000000000
for s in nginx nixmesh; do
    url[$s,big]="${base[$s]}/$(nar_url_of "${base[$s]}" "$big_path")"
    url[$s,tree]="${base[$s]}/$(nar_url_of "${base[$s]}" "$tree_path")"
    url[$s,narinfo]="${base[$s]}/$(basename "$big_path" | cut -d- -f1).narinfo"
    url[$s,miss]="${base[$s]}/$missing.narinfo"
    code=$(curl -s -o /dev/null -w '%{http_code}' "${url[$s,miss]}")
    [[ $code == 404 ]] || { echo "bench: $s answers $code for a missing narinfo" >&2; exit 1; }
done

echo "== checking that both serve the same bytes (also warms the page cache)"
for what in big tree; do
    a=$(curl -sf "${url[nginx,$what]}" | sha256sum)
    b=$(curl -sf "${url[nixmesh,$what]}" | sha256sum)
    [[ $a == "$b" ]] || { echo "bench: the $what NAR differs between servers" >&2; exit 1; }
done
big_nar=$(curl -sfI "${url[nginx,big]}" | tr -d '\r' | awk 'tolower($1)=="content-length:" {print $2}')
tree_nar=$(curl -sfI "${url[nginx,tree]}" | tr -d '\r' | awk 'tolower($1)=="content-length:" {print $2}')

# ---------------------------------------------------------------- measuring

# name | url key | wrk threads | connections
rows=(
    "NAR $BIG_MIB MiB file, 1 conn|big|1|1"
    "NAR $BIG_MIB MiB file, $CONNS conns|big|$THREADS|$CONNS"
    "NAR $SMALL_FILES-file tree, 1 conn|tree|1|1"
    "NAR $SMALL_FILES-file tree, $CONNS conns|tree|$THREADS|$CONNS"
    "narinfo hit, 1 conn|narinfo|1|1"
    "narinfo hit, $CONNS conns|narinfo|$THREADS|$CONNS"
    "narinfo 404, $CONNS conns|miss|$THREADS|$CONNS"
)
results="$work/results.tsv"
for i in "${!rows[@]}"; do echo "# row $i: ${rows[$i]%%|*}"; done >"$results"
printf '# row\tserver\tround\treq/s\tMiB/s\tCPU%%\tCPU-s/GiB\tCPU-us/req\n' >>"$results"
hz=$(getconf CLK_TCK)

measure() { # row-index server round
    local i=$1 s=$2 r=$3 name key t c out line t0 t1 w0 w1
    IFS='|' read -r name key t c <<<"${rows[$i]}"
    t0=$(cpu_ticks "${pid_of[$s]}")
    w0=$(date +%s%N)
    out=$(wrk -t"$t" -c"$c" -d"${DURATION}s" --timeout 120s -s "$lua" "${url[$s,$key]}" 2>&1) || true
    w1=$(date +%s%N)
    t1=$(cpu_ticks "${pid_of[$s]}")
    if ! kill -0 "${pid_of[$s]}" 2>/dev/null; then
        echo "bench: $s (pid ${pid_of[$s]}) is gone; its log:" >&2
        tail -n 20 "$work/agent.log" "$work/nginx/error.log" >&2
        exit 1
    fi
    line=$(grep '^WRK ' <<<"$out") || { echo "bench: $s, $name: $out" >&2; exit 1; }
    # duration_us requests bytes status connect read write timeout
    # shellcheck disable=SC2046
    set -- $(sed 's/[a-z_]*=//g; s/^WRK //' <<<"$line")
    if [[ $key != miss && $4 -ne 0 ]] || (($5 + $6 + $7 + $8)); then
        echo "bench: $s, $name: errors: $line" >&2
    fi
    if [[ $key == miss && $4 -ne $2 ]]; then
        echo "bench: $s, $name: expected only 404s: $line" >&2
    fi
    # index server round req/s MiB/s CPU% CPU-s/GiB CPU-us/req
    awk -v i="$i" -v s="$s" -v r="$r" -v us="$1" -v n="$2" -v b="$3" \
        -v cpu=$((t1 - t0)) -v hz="$hz" -v wall=$(((w1 - w0) / 1000)) 'BEGIN {
        printf "%d\t%s\t%d\t%.1f\t%.1f\t%.0f\t%.3f\t%.1f\n", i, s, r, n / (us / 1e6),
            b / (us / 1e6) / 1048576, 100 * cpu / hz / (wall / 1e6),
            cpu / hz / (b / 1073741824), 1e6 * cpu / hz / (n > 0 ? n : 1)
    }' >>"$results"
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== measuring: ${#rows[@]} rows x 2 servers x $ROUNDS rounds x ${DURATION}s"
for r in $(seq 1 "$ROUNDS"); do
    if ((r % 2)); then order=(nginx nixmesh); else order=(nixmesh nginx); fi
    for i in "${!rows[@]}"; do
        for s in "${order[@]}"; do
            measure "$i" "$s" "$r"
        done
    done
    echo "   round $r/$ROUNDS done"
done
mesh_hwm_run=$(peak_rss_kib "$mesh_pid")
nginx_hwm_run=$(peak_rss_kib "$nginx_pid")

median() { sort -g | awk '{v[NR] = $1} END {
    if (NR == 0) { print "nan"; exit }
    print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -F'\t' -v i="$1" -v s="$2" -v c="$3" '$1 == i && $2 == s {print $c}' "$results"; }
# nixmesh/nginx per round: each pair ran back to back, so it shares the noise.
ratios() {
    awk -F'\t' -v i="$1" -v c="$2" '$1 == i { v[$2, $3] = $c; r[$3] = 1 }
        END { for (k in r) if (v["nginx", k] > 0) print v["nixmesh", k] / v["nginx", k] }' "$results"
}

echo
echo "nixmesh HTTP cache vs nginx (static files), 127.0.0.1, medians of $ROUNDS x ${DURATION}s runs"
echo "NAR sizes: $BIG_MIB MiB file -> $big_nar bytes; $SMALL_FILES-file tree -> $tree_nar bytes"
echo "nixmesh: $NIXMESH (built from: $built_from)"
echo "load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ratio = median over rounds of nixmesh/nginx (range: lowest-highest round)."
echo "goal: NARs >= 1.00x nginx; narinfo >= 0.50x (within 2x)."
echo "CPU% = server CPU time / wall time (200% = both cores; wrk shares the cores)."
echo "cost = server CPU per unit served: CPU seconds per GiB of NAR, CPU us per narinfo."
printf '\n%-30s %12s %12s %6s %11s %6s %6s %6s %10s %10s\n' "row" "nginx" "nixmesh" \
    "ratio" "range" "goal" "CPU ng" "CPU nm" "cost ng" "cost nm"
for i in "${!rows[@]}"; do
    IFS='|' read -r name key _ _ <<<"${rows[$i]}"
    if [[ $key == big || $key == tree ]]; then
        c=5 unit="MiB/s" cc=7 cunit="s/GiB" cfmt="%.2f" goal=1.0
    else
        c=4 unit="req/s" cc=8 cunit="us" cfmt="%.1f" goal=0.5
    fi
    awk -v name="$name" -v u="$unit" -v cu="$cunit" -v cf="$cfmt" -v goal="$goal" \
        -v n="$(col "$i" nginx "$c" | median)" -v m="$(col "$i" nixmesh "$c" | median)" \
        -v r="$(ratios "$i" "$c" | median)" \
        -v lo="$(ratios "$i" "$c" | sort -g | head -n1)" \
        -v hi="$(ratios "$i" "$c" | sort -g | tail -n1)" \
        -v pn="$(col "$i" nginx 6 | median)" -v pm="$(col "$i" nixmesh 6 | median)" \
        -v kn="$(col "$i" nginx "$cc" | median)" -v km="$(col "$i" nixmesh "$cc" | median)" 'BEGIN {
        printf "%-30s %12s %12s %5.2fx %11s %6s %5.0f%% %5.0f%% %10s %10s\n", name,
            sprintf("%.0f %s", n, u), sprintf("%.0f %s", m, u), r,
            sprintf("%.2f-%.2f", lo, hi), (r >= goal) ? "met" : "missed", pn, pm,
            sprintf(cf " %s", kn, cu), sprintf(cf " %s", km, cu) }'
done
if [[ -n $RESULTS ]]; then
    cp "$results" "$RESULTS"
    echo "(raw per-run numbers: $RESULTS)"
fi
echo
echo "peak RSS after the run: nixmesh $((mesh_hwm_run / 1024)) MiB, nginx (master+workers) $((nginx_hwm_run / 1024)) MiB"

# ---------------------------------------------------------------- memory

# A fresh agent per NAR size, so VmHWM belongs to that size alone: one
# download, then CONNS at once.
rss_for() { # store-path size-label
    local path=$1 label=$2 port u idle one par j
    port=$(free_port)
    start_agent "$port" "$work/agent-rss-$port.log"
    u="http://127.0.0.1:$port/$(nar_url_of "http://127.0.0.1:$port" "$path")"
    idle=$(peak_rss_kib "$agent_pid")
    curl -sf -o /dev/null "$u"
    one=$(peak_rss_kib "$agent_pid")
    local cpids=()
    for j in $(seq "$CONNS"); do
        curl -sf -o /dev/null "$u" &
        cpids+=($!)
    done
    for j in "${cpids[@]}"; do wait "$j"; done
    par=$(peak_rss_kib "$agent_pid")
    stop_agent "$agent_pid"
    printf '%-14s %10s %12s %14s\n' "$label" "$((idle / 1024)) MiB" "$((one / 1024)) MiB" "$((par / 1024)) MiB"
}

echo
echo "nixmesh peak RSS (VmHWM) of a fresh agent serving one NAR"
printf '%-14s %10s %12s %14s\n' "NAR" "started" "1 download" "$CONNS at once"
rss_for "$big_path" "$BIG_MIB MiB"
if [[ -n $huge_path ]]; then
    rss_for "$huge_path" "$RSS_BIG_MIB MiB"
fi
