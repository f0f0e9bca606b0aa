-- wrk's totals on one line that bench/http_cache.sh can parse. Bytes count
-- every byte read, so a NAR still in flight when the run stops counts too.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK duration_us=%d requests=%d bytes=%d status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.duration, summary.requests, summary.bytes,
    e.status, e.connect, e.read, e.write, e.timeout))
end
