"""Messages lost between a queue and Kombu's unacknowledged set, and putting them back.

A worker's main process takes a message with BRPOP, which takes it off its queue in Redis, and
then, in a second command, writes it into Kombu's unacknowledged set (``worker.held.QoS``). A
process killed between the two (the reply in flight, being parsed, the write not yet sent), or
whose connection is cut there, leaves a job whose record says ``queued`` and whose message is
nowhere: not on its queue, not in the unacknowledged set, so neither the reaper nor the
visibility timeout can bring it back, and it would wait until it expires (``max_wait_s``). No
single Redis command takes from several lists at once and moves what it took, so the window
cannot be closed where it opens; this sweep closes it after.

Every worker sweeps the queues it consumes, from its liveness loop, every ``interval_s`` (the
heartbeat TTL): it looks at the first ``HEAD`` jobs of each queue's line (its queued jobs in
their place in line: a job whose message was taken is ahead of every job still waiting behind it,
so a lost one reaches the head as the jobs before it are claimed) and finds each one's message on
its queue (the very message, or a copy restored from the unacknowledged set: other bytes, the same
delivery tag) or in the unacknowledged set, in one script. A job found without one is suspect;
one still without one at this worker's next sweep, an interval later, gets a new message (a
delivery tag of its own) at the end of its queue that workers take from, in the same script that
found it still without: a live worker between its BRPOP and its write takes milliseconds, not an
interval, and if one took longer, the second copy finds the job claimed and is dropped
(``JobRunner._claim``), so the job still runs once. Sweepers racing each other put one back: the
new message is the record's ``queued_message`` from then on, found by the next.

A lost message's job is put back within three intervals of reaching the head of its line (the
first look within an interval and the liveness loop's third of one, the second an interval
later). A sweep costs a few commands per job looked at; a queue is read through only for a job whose
message is not where it was pushed (restored, or lost).
"""

from __future__ import annotations

import json
import logging
import time

from routing.celery_config import UNACKED_KEY
from routing.jobs.store import JobStore

log = logging.getLogger(__name__)

# Jobs looked at at the head of each queue's line, per sweep.
HEAD = 16
# Messages a script reads at once while it looks through a queue for a restored copy.
_CHUNK = 100

# ARGV[1]: JSON {lines, head, job ([head, tail] of a job's key), unacked, chunk, again (job id ->
# [list, message]: the suspects of the last sweep, with a new message for each)}. Returns
# {lost, put back}: the ids found without a message and not suspect before, and those given one.
_SWEEP = """
local a = cjson.decode(ARGV[1])
local function found(list, message)
  if redis.call('LPOS', list, message, 'RANK', -1) then return true end
  local ok, decoded = pcall(cjson.decode, message)
  local tag = ok and type(decoded) == 'table' and type(decoded.properties) == 'table'
    and decoded.properties.delivery_tag
  if type(tag) ~= 'string' then return true end  -- not a message the fleet made: not judged
  if redis.call('HEXISTS', a.unacked, tag) == 1 then return true end
  -- Restored copies go to the end workers take from: look there first.
  local length = redis.call('LLEN', list)
  for from = 1, length, a.chunk do
    for _, item in ipairs(redis.call('LRANGE', list, -(from + a.chunk - 1), -from)) do
      if string.find(item, tag, 1, true) then return true end
    end
  end
  return false
end
local lost, put_back = {}, {}
for _, line in ipairs(a.lines) do
  for _, id in ipairs(redis.call('ZRANGE', line, 0, a.head - 1)) do
    local job = a.job[1] .. id .. a.job[2]
    local f = redis.call('HMGET', job, 'status', 'queued_message', 'queued_list')
    if f[1] == 'queued' and f[2] and f[3] and not found(f[3], f[2]) then
      local again = a.again[id]
      if again and again[1] == f[3] then
        redis.call('RPUSH', f[3], again[2])
        redis.call('HSET', job, 'queued_message', again[2])
        table.insert(put_back, id)
      else
        table.insert(lost, id)
      end
    end
  end
end
return {lost, put_back}
"""


class LostSweep:
    """Gives a new message to every job at the head of ``queues``' lines whose message was found
    nowhere on two sweeps ``interval_s`` apart (the store's ``messages`` builds it)."""

    def __init__(self, store: JobStore, queues: list[str], interval_s: float):
        if store.messages is None:
            raise ValueError("LostSweep: the store has no messages to put a lost one back with")
        self.store = store
        self.queues = queues
        self.interval_s = interval_s
        self._script = store.client.register_script(_SWEEP)
        self._suspects: set[str] = set()
        self._last = float("-inf")

    def maybe_sweep(self) -> list[str]:
        """Sweep if ``interval_s`` has passed since the last one (for a loop that runs more
        often); the ids of the jobs given a new message."""
        if time.monotonic() - self._last < self.interval_s:
            return []
        return self.sweep()

    def sweep(self) -> list[str]:
        self._last = time.monotonic()
        keys, messages = self.store.keys, self.store.messages
        assert messages is not None
        again = {}
        for job_id in sorted(self._suspects):
            queue = self.store.client.hget(keys.job(job_id), "queue")
            if queue is not None:
                again[job_id] = list(messages.run_job(job_id, queue.decode()))
        lost, put_back = self._script(
            args=[
                json.dumps(
                    {
                        "lines": [keys.queued(queue) for queue in self.queues],
                        "head": HEAD,
                        "job": keys.template(keys.job),
                        "unacked": UNACKED_KEY,
                        "chunk": _CHUNK,
                        "again": again,
                    }
                )
            ]
        )
        self._suspects = {job_id.decode() for job_id in lost}
        put_back = [job_id.decode() for job_id in put_back]
        if put_back:
            log.warning(
                "put back the messages of jobs %s: taken off their queue by a worker that died (or "
                "lost its connection) before it wrote them to the unacknowledged set",
                ", ".join(put_back),
            )
        return put_back
