"""The Lua scripts that change job records (``routing.jobs.store.JobStore`` runs them).

Each is one atomic step in Redis: a state change checks the transition, writes the record, keeps
the indexes (queue lines, running set, the tenant's sets), appends the event, queues the webhook
delivery and counts the metrics, all or nothing. The key and argument layout of each script is
written above it; ``JobStore`` is the only caller.
"""

# Upper bounds of the run-time histogram (seconds): from a small image to an 8-GPU video.
RUN_S_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# Entries kept in one job's own event stream (``Keys.job_events``: the API's live events read it).
JOB_EVENTS_MAXLEN = 1000

# Copies an event into the job's own stream ("<job key>:events"), bounded, expiring when the
# record does: the record's TTL is set before the event is written, and copied here.
JOB_EMIT = """
local function emit_job(job_key, ...)
  local stream = job_key .. ':events'
  local entry_id = redis.call('XADD', stream, 'MAXLEN', '~', JOB_EVENTS_MAXLEN, '*', ...)
  local ttl = redis.call('TTL', job_key)
  if ttl > 0 then redis.call('EXPIRE', stream, ttl) end
  return entry_id
end
""".replace("JOB_EVENTS_MAXLEN", str(JOB_EVENTS_MAXLEN))

# Appends one event to the stream and, when the job's webhook asks for this event, pushes the
# prebuilt delivery message onto the webhooks queue: a state change, its event and its webhook
# delivery are one atomic write.
EMIT = (
    JOB_EMIT
    + """
local function emit(job_key, stream, hooks, maxlen, event_type, status, now, event_id, message, step, total)
  local id = redis.call('HGET', job_key, 'id')
  if step then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', event_type, 'job_id', id,
      'status', status, 'at', now, 'event_id', event_id, 'step', step, 'total', total)
    emit_job(job_key, 'type', event_type, 'status', status, 'at', now, 'step', step, 'total', total)
  else
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', event_type, 'job_id', id,
      'status', status, 'at', now, 'event_id', event_id)
    emit_job(job_key, 'type', event_type, 'status', status, 'at', now)
  end
  local wanted = redis.call('HGET', job_key, 'webhook_events')
  if message ~= '' and wanted and wanted ~= '' then
    local short = string.sub(event_type, 5)
    if string.find(',' .. wanted .. ',', ',' .. short .. ',', 1, true) then
      redis.call('LPUSH', hooks, message)
    end
  end
end
"""
)

# KEYS: job, events, webhooks queue.  ARGV: target, allowed sources (comma list), now, event
# type, stream maxlen, ttl_s (0: keep), field to increment ('' for none), event id, webhook
# message, key prefix, expected worker ('' for any), queue and message to push when the job goes
# back to queued ('' for none), then field/value pairs to set. Also keeps the queue lines, the
# running set and the tenant's in-flight set in step with the state.
TRANSITION = (
    EMIT
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local allowed = false
for source in string.gmatch(ARGV[2], '[^,]+') do
  if source == current then allowed = true end
end
if not allowed then return {0, current} end
if ARGV[11] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[11] then
  return {0, current}
end
local prefix = ARGV[10]
local id = redis.call('HGET', KEYS[1], 'id')
if current == 'queued' then
  redis.call('ZREM', prefix .. ':queued:' .. redis.call('HGET', KEYS[1], 'queue'), id)
end
if current == 'running' then redis.call('SREM', prefix .. ':running', id) end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[3])
if #ARGV >= 14 then redis.call('HSET', KEYS[1], unpack(ARGV, 14)) end
if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[7], 1) end
if ARGV[1] == 'running' then redis.call('SADD', prefix .. ':running', id) end
if ARGV[1] == 'queued' then
  local line = prefix .. ':queued:' .. redis.call('HGET', KEYS[1], 'queue')
  redis.call('ZADD', line, redis.call('INCR', prefix .. ':seq'), id)
  if ARGV[12] ~= '' then redis.call('LPUSH', ARGV[12], ARGV[13]) end
end
if ARGV[6] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  local tenant = redis.call('HGET', KEYS[1], 'tenant') or ''
  redis.call('SREM', prefix .. ':tenant:' .. tenant .. ':inflight', id)
  -- Fleet metrics (producer/metrics.py): finished jobs, and run time of the succeeded ones.
  local model = redis.call('HGET', KEYS[1], 'model')
  local class = string.match(redis.call('HGET', KEYS[1], 'queue'), '^[^.]+')
  local label = model .. '|' .. class
  redis.call('HINCRBY', prefix .. ':metrics:finished', label .. '|' .. ARGV[1], 1)
  local started = tonumber(redis.call('HGET', KEYS[1], 'started_at') or '')
  if ARGV[1] == 'succeeded' and started then
    local seconds = tonumber(ARGV[3]) - started
    redis.call('HINCRBYFLOAT', prefix .. ':metrics:run_s', label .. '|sum', seconds)
    redis.call('HINCRBY', prefix .. ':metrics:run_s', label .. '|count', 1)
    for bucket in string.gmatch('RUN_S_BUCKETS', '[^,]+') do
      if seconds <= tonumber(bucket) then
        redis.call('HINCRBY', prefix .. ':metrics:run_s', label .. '|le|' .. bucket, 1)
      end
    end
  end
end
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[5], ARGV[4], ARGV[1], ARGV[3], ARGV[8], ARGV[9])
return {1, current}
""".replace("RUN_S_BUCKETS", ",".join(str(b) for b in RUN_S_BUCKETS))
)


# KEYS: job, events, idempotency key (or the job key again when there is none), queue, tenant
# in-flight set, tenant job index, queue line, line counter, submitted-jobs metric.
# ARGV: now, stream maxlen, ttl_s, has idempotency key ('1'/'0'), queue message, tenant in-flight
# limit (0: none), metric label, then field/value pairs ('id' first). Record, event, indexes and queue message
# are written together or not at all; {2, ''} when the tenant is at its limit.
CREATE = (
    JOB_EMIT
    + """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
end
local limit = tonumber(ARGV[6])
if limit > 0 and redis.call('SCARD', KEYS[5]) >= limit then return {2, ''} end
local id = ARGV[9]
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
if ARGV[4] == '1' then redis.call('SET', KEYS[3], id, 'EX', ARGV[3]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
  'type', 'job.queued', 'job_id', id, 'status', 'queued', 'at', ARGV[1])
emit_job(KEYS[1], 'type', 'job.queued', 'status', 'queued', 'at', ARGV[1])
redis.call('SADD', KEYS[5], id)
redis.call('ZADD', KEYS[6], ARGV[1], id)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[7], redis.call('INCR', KEYS[8]), id)
redis.call('LPUSH', KEYS[4], ARGV[5])
redis.call('HINCRBY', KEYS[9], ARGV[7], 1)
return {1, id}
"""
)

# KEYS: job, events, webhooks queue, the worker's drain flag.  ARGV: step, total, now, stream
# maxlen, event id, webhook message, least seconds between progress webhooks. Returns the job's
# status, whether a cancel was asked and whether the worker is draining, so a step costs one
# round trip.
PROGRESS = (
    EMIT
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return {status or '', '1', '0'} end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'total_steps', ARGV[2], 'updated_at', ARGV[3])
local message = ARGV[6]
local last = tonumber(redis.call('HGET', KEYS[1], 'webhook_progress_at') or '0') or 0
if tonumber(ARGV[3]) - last < tonumber(ARGV[7]) and ARGV[1] ~= ARGV[2] then
  message = ''
elseif message ~= '' then
  redis.call('HSET', KEYS[1], 'webhook_progress_at', ARGV[3])
end
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[4], 'job.progress', status, ARGV[3], ARGV[5], message, ARGV[1], ARGV[2])
return {status, redis.call('HGET', KEYS[1], 'cancel_requested') or '0', redis.call('EXISTS', KEYS[4])}
"""
)

# KEYS: job.  Marks a cancel on a running job; the worker sees it at the next step.
REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status or ''
"""
