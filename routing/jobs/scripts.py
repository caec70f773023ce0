"""The Lua scripts that change job records (``routing.jobs.store.JobStore`` runs them).

Each is one atomic step in Redis: a state change checks the transition, writes the record, keeps
the indexes (queue lines, running set, the tenant's sets), appends the event, queues the webhook
delivery and counts the metrics, all or nothing. ``JobStore`` is the only caller.

Each script takes one argument, a JSON object of named fields (its layout is written above the
script), and no KEYS: every key name comes in under ``keys``, made by ``routing.jobs.keys.Keys``,
so none is spelled here. A key that holds a value the script reads inside Redis (the job's queue
or tenant) comes as a ``Keys.template``, ``[head, tail]``. All values are strings, as Redis
arguments always are.
"""

from routing.jobs.codecs import LABEL_SEP

# Upper bounds of the run-time histogram (seconds): from a small image to an 8-GPU video.
RUN_S_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# Decodes the script's one argument, and joins a ``Keys.template`` around a value.
ARGS = """
local a = cjson.decode(ARGV[1])
local function fill(template, value) return template[1] .. value .. template[2] end
"""

# Entries kept in one job's own event stream (``Keys.job_events``: the API's live events read it).
JOB_EVENTS_MAXLEN = 1000

# Copies an event into the job's own stream (keys.job_events), bounded, expiring when the record
# does: a finished record's TTL is set before its last event is written, and copied here.
JOB_EMIT = """
local function emit_job(keys, ...)
  redis.call('XADD', keys.job_events, 'MAXLEN', '~', JOB_EVENTS_MAXLEN, '*', ...)
  local ttl = redis.call('TTL', keys.job)
  if ttl > 0 then redis.call('EXPIRE', keys.job_events, ttl) end
end
""".replace("JOB_EVENTS_MAXLEN", str(JOB_EVENTS_MAXLEN))

# Appends one event to the stream and, when the job's webhook asks for this event, pushes the
# prebuilt delivery message onto the webhooks queue: a state change, its event and its webhook
# delivery are one atomic write. Reads keys.job, keys.events, keys.webhooks, maxlen, now and
# event_id from the script's argument, and copies the event into the job's own stream.
EMIT = (
    JOB_EMIT
    + """
local function emit(a, event_type, status, message, step, total, stage)
  local id = redis.call('HGET', a.keys.job, 'id')
  if step and stage and stage ~= '' then
    redis.call('XADD', a.keys.events, 'MAXLEN', '~', a.maxlen, '*', 'type', event_type, 'job_id', id,
      'status', status, 'at', a.now, 'event_id', a.event_id, 'step', step, 'total', total, 'stage', stage)
    emit_job(a.keys, 'type', event_type, 'status', status, 'at', a.now, 'step', step, 'total', total,
      'stage', stage)
  elseif step then
    redis.call('XADD', a.keys.events, 'MAXLEN', '~', a.maxlen, '*', 'type', event_type, 'job_id', id,
      'status', status, 'at', a.now, 'event_id', a.event_id, 'step', step, 'total', total)
    emit_job(a.keys, 'type', event_type, 'status', status, 'at', a.now, 'step', step, 'total', total)
  else
    redis.call('XADD', a.keys.events, 'MAXLEN', '~', a.maxlen, '*', 'type', event_type, 'job_id', id,
      'status', status, 'at', a.now, 'event_id', a.event_id)
    emit_job(a.keys, 'type', event_type, 'status', status, 'at', a.now)
  end
  local wanted = redis.call('HGET', a.keys.job, 'webhook_events')
  if message ~= '' and wanted and wanted ~= '' then
    local short = string.sub(event_type, 5)
    if string.find(',' .. wanted .. ',', ',' .. short .. ',', 1, true) then
      redis.call('LPUSH', a.keys.webhooks, message)
    end
  end
end
"""
)

# keys: job, events, webhooks (queue), queued (template, by queue), waiting, running, sequence,
# in_flight (template, by tenant), idempotency (template, by key), finished and run_s (metrics),
# usage and usage_month (templates, by tenant folder: its day's hash and its month's),
# usage_tenants (the day's), tenants (metrics).  target, sources (comma list), now, usage_expire_at,
# no_tenant, event_type, maxlen (of the stream), ttl_s ('0': keep), count (field to increment, '' for
# none), event_id, message (webhook delivery), worker (expected owner, '' for any), attempt
# (expected attempt, '' for any), requeue ([list, message] to push when the job goes back to
# queued, [] for none), fields (field/value pairs to set, flat), takeover ({event_id, message,
# reason} of the job.queued a claim from running records first; {} for none), canceled (for a running job
# going back to queued or running: {event_id, message, ttl_s} of the job.canceled it becomes
# instead when its cancel was asked for; {} otherwise), dead_letter ([list, entry, max]: pushed
# and the list trimmed to max when the job ends failed, [] for none). Also keeps the queue
# lines, the waiting set, the running set and the tenant's in-flight set in step with the
# state. A queued job's record holds its Celery message (queued_message, on the list
# queued_list): a queued job canceled takes it off that list, so the autoscaler (which counts
# the list) never starts a worker for it. An idempotency key outlives its record by no more
# than the record's TTL (a canceled job's may be short). Returns {1, from, to} or {0, status}.
TRANSITION = (
    ARGS
    + EMIT
    + """
local keys = a.keys
local current = redis.call('HGET', keys.job, 'status')
if not current then return {0, ''} end
local allowed = false
for source in string.gmatch(a.sources, '[^,]+') do
  if source == current then allowed = true end
end
if not allowed then return {0, current} end
if a.worker ~= '' and redis.call('HGET', keys.job, 'worker') ~= a.worker then
  return {0, current}
end
if a.attempt ~= '' and (redis.call('HGET', keys.job, 'attempt') or '0') ~= a.attempt then
  return {0, current}
end
-- A cancel asked for while the job ran outlives its worker: a hand-back, an escalation or a
-- redelivery of that job ends it canceled instead of running it again.
if a.canceled.ttl_s and current == 'running' and redis.call('HGET', keys.job, 'cancel_requested') == '1' then
  a.target, a.event_type, a.ttl_s = 'canceled', 'job.canceled', a.canceled.ttl_s
  a.event_id, a.message = a.canceled.event_id, a.canceled.message
  a.count, a.requeue, a.fields = '', {}, {'finished_at', a.now}
end
local id = redis.call('HGET', keys.job, 'id')
if current == 'queued' then
  redis.call('ZREM', fill(keys.queued, redis.call('HGET', keys.job, 'queue')), id)
  redis.call('ZREM', keys.waiting, id)
  local message = redis.call('HGET', keys.job, 'queued_message')
  if message and a.target == 'canceled' then
    redis.call('LREM', redis.call('HGET', keys.job, 'queued_list'), 1, message)
  end
  redis.call('HDEL', keys.job, 'queued_message', 'queued_list')
end
if current == 'running' then redis.call('SREM', keys.running, id) end
redis.call('HSET', keys.job, 'status', a.target, 'updated_at', a.now)
if #a.fields > 0 then redis.call('HSET', keys.job, unpack(a.fields)) end
if a.count ~= '' then redis.call('HINCRBY', keys.job, a.count, 1) end
if a.target == 'running' then redis.call('SADD', keys.running, id) end
if a.target == 'queued' then
  local line = fill(keys.queued, redis.call('HGET', keys.job, 'queue'))
  redis.call('ZADD', line, redis.call('INCR', keys.sequence), id)
  redis.call('ZADD', keys.waiting, redis.call('HGET', keys.job, 'created_at'), id)
  if #a.requeue > 0 then
    redis.call('LPUSH', a.requeue[1], a.requeue[2])
    redis.call('HSET', keys.job, 'queued_message', a.requeue[2], 'queued_list', a.requeue[1])
  end
end
if a.ttl_s ~= '0' then
  redis.call('EXPIRE', keys.job, a.ttl_s)
  local idempotency_key = redis.call('HGET', keys.job, 'idempotency_key') or ''
  if idempotency_key ~= '' then
    local idempotency = fill(keys.idempotency, idempotency_key)
    local left = redis.call('TTL', idempotency)
    if left > tonumber(a.ttl_s) then redis.call('EXPIRE', idempotency, a.ttl_s) end
  end
  local tenant = redis.call('HGET', keys.job, 'tenant') or ''
  redis.call('SREM', fill(keys.in_flight, tenant), id)
  -- Fleet metrics (producer/metrics.py): finished jobs, and run time of the succeeded ones,
  -- labelled as routing.jobs.codecs.encode_label does; the class is the queue's name up to its
  -- first '.' (routing.classes.parse_queue).
  local sep = 'LABEL_SEP'
  local model = redis.call('HGET', keys.job, 'model')
  local class = string.match(redis.call('HGET', keys.job, 'queue'), '^[^.]+')
  local label = model .. sep .. class
  redis.call('HINCRBY', keys.finished, label .. sep .. a.target, 1)
  local started = tonumber(redis.call('HGET', keys.job, 'started_at') or '')
  if a.target == 'succeeded' and started then
    local seconds = tonumber(a.now) - started
    redis.call('HINCRBYFLOAT', keys.run_s, label .. sep .. 'sum', seconds)
    redis.call('HINCRBY', keys.run_s, label .. sep .. 'count', 1)
    for bucket in string.gmatch('RUN_S_BUCKETS', '[^,]+') do
      if seconds <= tonumber(bucket) then
        redis.call('HINCRBY', keys.run_s, label .. sep .. 'le' .. sep .. bucket, 1)
      end
    end
  end
  -- The tenant's usage (routing.jobs.usage): its day's hash, by model, class and end; the time
  -- the ending attempt held its worker, as the worker measured it; a succeeded job's outputs.
  local folder = tenant ~= '' and tenant or a.no_tenant
  local usage = fill(keys.usage, folder)
  local used = label .. sep .. a.target .. sep
  redis.call('HINCRBY', usage, used .. 'jobs', 1)
  redis.call('HINCRBY', keys.tenants, folder .. sep .. used .. 'jobs', 1)
  local ok, timings = pcall(cjson.decode, redis.call('HGET', keys.job, 'timings') or '')
  local held = ok and type(timings) == 'table' and tonumber(timings.held_s) or 0
  if held > 0 then
    redis.call('HINCRBYFLOAT', usage, used .. 'held_s', held)
    redis.call('HINCRBYFLOAT', keys.tenants, folder .. sep .. used .. 'held_s', held)
    -- The month's total, once MONTH_HELD has counted the month into it (until then, that
    -- script counts this job from the day's hash).
    local month = fill(keys.usage_month, folder)
    if redis.call('HEXISTS', month, 'counted') == 1 then redis.call('HINCRBYFLOAT', month, class, held) end
  end
  local got, outputs = false, nil
  if a.target == 'succeeded' then
    got, outputs = pcall(cjson.decode, redis.call('HGET', keys.job, 'outputs') or '')
  end
  if got and type(outputs) == 'table' and #outputs > 0 then
    local bytes, video_s = 0, 0
    for _, output in ipairs(outputs) do
      bytes = bytes + (tonumber(output.size_bytes) or 0)
      local frames, fps = tonumber(output.frames), tonumber(output.fps)
      if frames and fps and fps > 0 then video_s = video_s + frames / fps end
    end
    redis.call('HINCRBY', usage, used .. 'outputs', #outputs)
    redis.call('HINCRBY', usage, used .. 'output_bytes', bytes)
    if video_s > 0 then redis.call('HINCRBYFLOAT', usage, used .. 'video_s', video_s) end
  end
  redis.call('EXPIREAT', usage, a.usage_expire_at)
  redis.call('SADD', keys.usage_tenants, folder)
  redis.call('EXPIREAT', keys.usage_tenants, a.usage_expire_at)
end
if #a.dead_letter > 0 and a.target == 'failed' then
  redis.call('LPUSH', a.dead_letter[1], a.dead_letter[2])
  redis.call('LTRIM', a.dead_letter[1], 0, tonumber(a.dead_letter[3]) - 1)
end
-- A claim of a job its dead worker left running: the hand-back the reaper would have made,
-- recorded and announced first (see lifecycle.Move.takeover).
if a.takeover.reason and current == 'running' and a.target == 'running' then
  redis.call('HSET', keys.job, 'handed_back', a.takeover.reason)
  local event_id = a.event_id
  a.event_id = a.takeover.event_id
  emit(a, 'job.queued', 'queued', a.takeover.message)
  a.event_id = event_id
end
emit(a, a.event_type, a.target, a.message)
return {1, current, a.target}
""".replace("RUN_S_BUCKETS", ",".join(str(b) for b in RUN_S_BUCKETS)).replace("LABEL_SEP", LABEL_SEP)
)


# keys: job, job_events, events, idempotency ('' when the job has no idempotency key), queue (the Celery
# queue list), in_flight and jobs (the tenant's sets), line (the job's queue line), waiting,
# sequence, submitted (metric).  id, now, maxlen (of the stream), ttl_s, message (queue message), limit
# (the tenant's in-flight limit, '0': none), label (metric), fields (field/value pairs of the
# record, flat). Record, event, indexes and queue message are written together or not at all;
# {2, ''} when the tenant is at its limit.
CREATE = (
    ARGS
    + JOB_EMIT
    + """
local keys = a.keys
if keys.idempotency ~= '' then
  local existing = redis.call('GET', keys.idempotency)
  if existing then return {0, existing} end
end
local limit = tonumber(a.limit)
if limit > 0 and redis.call('SCARD', keys.in_flight) >= limit then return {2, ''} end
local id = a.id
redis.call('HSET', keys.job, unpack(a.fields))
if keys.idempotency ~= '' then redis.call('SET', keys.idempotency, id, 'EX', a.ttl_s) end
redis.call('XADD', keys.events, 'MAXLEN', '~', a.maxlen, '*',
  'type', 'job.queued', 'job_id', id, 'status', 'queued', 'at', a.now)
emit_job(keys, 'type', 'job.queued', 'status', 'queued', 'at', a.now)
redis.call('SADD', keys.in_flight, id)
redis.call('ZADD', keys.jobs, a.now, id)
redis.call('ZREMRANGEBYSCORE', keys.jobs, '-inf', tonumber(a.now) - tonumber(a.ttl_s))
redis.call('ZADD', keys.line, redis.call('INCR', keys.sequence), id)
redis.call('ZADD', keys.waiting, a.now, id)
redis.call('LPUSH', keys.queue, a.message)
redis.call('HINCRBY', keys.submitted, a.label, 1)
return {1, id}
"""
)

# What a running job's worker learns at each step: {status, cancel, drain, superseded}.
# ``refused(a)`` answers for a job that is no longer running (cancel), or runs now as another
# worker's or attempt's than a.worker and a.attempt ('' for any: superseded); nil while the run
# asking owns it. ``flags(a, status)`` then says whether a cancel was asked and whether the
# worker is draining (keys.drain exists; '' for no drain flag).
STOP = """
local function refused(a)
  local status = redis.call('HGET', a.keys.job, 'status')
  if status ~= 'running' then return {status or '', '1', '0', '0'} end
  if (a.worker ~= '' and redis.call('HGET', a.keys.job, 'worker') ~= a.worker)
      or (a.attempt ~= '' and redis.call('HGET', a.keys.job, 'attempt') ~= a.attempt) then
    return {status, '1', '0', '1'}
  end
  return nil
end
local function flags(a, status)
  local draining = 0
  if a.keys.drain ~= '' then draining = redis.call('EXISTS', a.keys.drain) end
  return {status, redis.call('HGET', a.keys.job, 'cancel_requested') or '0', draining, '0'}
end
"""

# keys: job, job_events, events, webhooks (queue), drain (the worker's drain flag, '' for none).
# step, total, stage (what the steps count: '' for denoising steps, else a stage of the work
# before them, such as preprocessing's), now, maxlen (of the stream), event_id, message (webhook
# delivery), interval_s (least seconds between progress webhooks), worker and attempt (the run
# reporting, '' for any). Returns what ``STOP`` says (nothing is written for a run that no
# longer owns the job), so a step costs one round trip.
PROGRESS = (
    ARGS
    + EMIT
    + STOP
    + """
local keys = a.keys
local no = refused(a)
if no then return no end
redis.call('HSET', keys.job, 'step', a.step, 'total_steps', a.total, 'stage', a.stage, 'updated_at', a.now)
local message = a.message
local last = tonumber(redis.call('HGET', keys.job, 'webhook_progress_at') or '0') or 0
if tonumber(a.now) - last < tonumber(a.interval_s) and a.step ~= a.total then
  message = ''
elseif message ~= '' then
  redis.call('HSET', keys.job, 'webhook_progress_at', a.now)
end
emit(a, 'job.progress', 'running', message, a.step, a.total, a.stage)
return flags(a, 'running')
"""
)

# keys: job, drain.  worker, attempt. What ``PROGRESS`` returns, writing nothing: a worker asks
# it between the progress it reports (preprocessing's frames, whose events are thinned out).
CHECK = (
    ARGS
    + STOP
    + """
local no = refused(a)
if no then return no end
return flags(a, 'running')
"""
)

# keys: job.  Marks a cancel on a running job; the worker sees it at the next step.
REQUEST_CANCEL = (
    ARGS
    + """
local status = redis.call('HGET', a.keys.job, 'status')
if status == 'running' then redis.call('HSET', a.keys.job, 'cancel_requested', '1') end
return status or ''
"""
)

# keys: month (the tenant's Keys.usage_month), days (its Keys.usage of every day of that month).
# expire_at. The month's held seconds by class, as flat field/value pairs: read from the month's
# hash once it is counted; before that (the tenant's first read of the month), counted from the
# days' hashes into it first, atomically with every job's end (TRANSITION adds to a counted month
# only). No class is named "counted".
MONTH_HELD = (
    ARGS
    + """
local keys = a.keys
if redis.call('HEXISTS', keys.month, 'counted') == 0 then
  local held = {}
  for _, day in ipairs(keys.days) do
    local flat = redis.call('HGETALL', day)
    for i = 1, #flat, 2 do
      local class = string.match(flat[i], '^[^LABEL_SEP]+LABEL_SEP([^LABEL_SEP]+)LABEL_SEP[^LABEL_SEP]+LABEL_SEPheld_s$')
      if class then held[class] = (held[class] or 0) + tonumber(flat[i + 1]) end
    end
  end
  for class, seconds in pairs(held) do redis.call('HINCRBYFLOAT', keys.month, class, seconds) end
  redis.call('HSET', keys.month, 'counted', '1')
  redis.call('EXPIREAT', keys.month, a.expire_at)
end
return redis.call('HGETALL', keys.month)
""".replace("LABEL_SEP", LABEL_SEP)
)

# keys: job, job_events, webhook_log, replays (the job's replay counter), jobs (template, by
# tenant: the tenant's index), idempotency (template, by key), deleted (the job's id remembered).
# id, ended (comma list of the statuses a job may be forgotten in), remember_s. Deletes an ended
# job's record, its event stream, its webhook log and its place in the tenant's index, as its TTL
# would have, and its idempotency key while that still names it; remembers the id with its
# tenant and kind (a hash) for remember_s (0: not). Returns 'forgotten', the status of a job not
# ended, or '' for none.
FORGET = (
    ARGS
    + """
local keys = a.keys
local status = redis.call('HGET', keys.job, 'status')
if not status then return '' end
local ended = false
for name in string.gmatch(a.ended, '[^,]+') do
  if name == status then ended = true end
end
if not ended then return status end
local idempotency_key = redis.call('HGET', keys.job, 'idempotency_key') or ''
if idempotency_key ~= '' then
  local idempotency = fill(keys.idempotency, idempotency_key)
  if redis.call('GET', idempotency) == a.id then redis.call('DEL', idempotency) end
end
local tenant = redis.call('HGET', keys.job, 'tenant') or ''
local kind = redis.call('HGET', keys.job, 'kind') or ''
redis.call('ZREM', fill(keys.jobs, tenant), a.id)
redis.call('DEL', keys.job, keys.job_events, keys.webhook_log, keys.replays)
if tonumber(a.remember_s) > 0 then
  redis.call('DEL', keys.deleted)
  redis.call('HSET', keys.deleted, 'tenant', tenant, 'kind', kind)
  redis.call('EXPIRE', keys.deleted, a.remember_s)
end
return 'forgotten'
"""
)

# keys: jobs (the tenant's index, scored by created_at).  limit, and the cursor's created_at and
# id ('' and '' for the first page). Returns up to ``limit`` flat (id, created_at) pairs, newest
# first in (created_at, id) order, from just after the cursor: jobs of one batch share a
# created_at, so the id breaks the tie and none is skipped or repeated. Atomic, so a job created
# meanwhile cannot shift the page.
LIST_PAGE = (
    ARGS
    + """
local keys = a.keys
local asc = a.order == 'asc'  -- else newest first
local start = 0
if a.created_at ~= '' then
  local rank = redis.call(asc and 'ZRANK' or 'ZREVRANK', keys.jobs, a.id)
  if rank and tonumber(redis.call('ZSCORE', keys.jobs, a.id)) == tonumber(a.created_at) then
    start = rank + 1
  else
    -- The cursor's job has left the index (its record expired): count what sorts before it.
    if asc then
      start = redis.call('ZCOUNT', keys.jobs, '-inf', '(' .. a.created_at)
    else
      start = redis.call('ZCOUNT', keys.jobs, '(' .. a.created_at, '+inf')
    end
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', keys.jobs, a.created_at, a.created_at)) do
      if (asc and id <= a.id) or (not asc and id >= a.id) then start = start + 1 end
    end
  end
end
return redis.call(asc and 'ZRANGE' or 'ZREVRANGE', keys.jobs, start, start + tonumber(a.limit) - 1, 'WITHSCORES')
"""
)
