"""Prometheus metrics of the whole fleet, read from Redis at scrape time.

Workers do not serve metrics themselves: a job's counters are written by the same Lua script that
changes its state (``routing.jobs.store``), and each worker's heartbeat carries its resident models and
GPU memory. So one scrape of the API's ``/metrics`` sees every worker, including ones that have
since stopped, and a counter can never disagree with the job records.

    fleet_jobs_submitted_total{model, class}
    fleet_jobs_finished_total{model, class, status}        succeeded | failed | canceled
    fleet_job_run_seconds{model, class}                    histogram of succeeded jobs' run time
    fleet_queue_depth{queue}                               messages waiting in each queue
    fleet_jobs_running                                     jobs some worker holds
    fleet_dead_letters                                     jobs given up after too many attempts
    fleet_workers{class}                                   live workers
    fleet_resident_models{worker, model}                   1 per model resident in a worker
    fleet_worker_gpu_memory_bytes{worker}                  allocated by torch (GPU workers)
    fleet_gpu_busy_seconds_total{worker, class}            seconds inside pipeline calls
    fleet_gpu_work_seconds_total{worker, class}            seconds with work (held a job, or
                                                           one was waiting); busy / work is the
                                                           GPU-busy share (worker.busy)
    fleet_model_load_seconds_total{model, class, phase}    cold starts: read (weights) | to_device
    fleet_model_loads_total{model, class}                  cold starts
    fleet_tenant_jobs_finished_total{tenant, model, class, status}   routing.jobs.usage, all time
    fleet_tenant_gpu_seconds_total{tenant, model, class, status}     (the tenant: its store folder,
                                                                     ``_`` for no tenant)
    fleet_tenant_gpu_budget_seconds{tenant}                a tenant's GPU budget for a UTC month
                                                           (gpu_s_per_month in FLEET_TENANTS)
    fleet_tenant_month_gpu_seconds{tenant}                 what its jobs used this month, as the
                                                           budget counts it (tenants with one)
    fleet_redis_replicas                                   replicas in sync with the master the
                                                           fleet writes to (Redis INFO replication)
    fleet_redis_min_replicas                               FLEET_REDIS_MIN_REPLICAS: below it,
                                                           submits are answered 503
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from routing.classes import WEBHOOK_QUEUE, VramClass, class_queues
from routing.jobs.codecs import encode_label, parse_label
from routing.jobs.keys import Keys
from routing.jobs.scripts import RUN_S_BUCKETS
from routing.jobs.usage import month_gpu_s
from routing.jobs.workers import worker_states


def _hash(client: redis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(key).items()}


class FleetCollector(Collector):
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        min_replicas: int = 0,
        per_tenant: bool = True,
        budgets: Mapping[str, float] | None = None,
    ):
        self.client = client
        self.keys = keys
        self.min_replicas = min_replicas
        # The fleet_tenant_* series (FLEET_METRICS_PER_TENANT): one per tenant, model, class and
        # end, which many tenants make many; usage stays in GET /v1/usage either way.
        self.per_tenant = per_tenant
        # The tenants' GPU budgets for a month (gpu_s_per_month), by tenant: a series or two per
        # tenant that has one, whatever per_tenant says, so that ops can see one coming to its end.
        self.budgets = dict(budgets or {})

    def collect(self) -> Iterator[Any]:
        submitted = CounterMetricFamily(
            "fleet_jobs_submitted", "Jobs accepted and queued", labels=["model", "class"]
        )
        for label, count in _hash(self.client, self.keys.metrics("submitted")).items():
            submitted.add_metric(list(parse_label(label, 2)), float(count))
        yield submitted

        finished = CounterMetricFamily(
            "fleet_jobs_finished", "Jobs that reached a final state", labels=["model", "class", "status"]
        )
        for label, count in _hash(self.client, self.keys.metrics("finished")).items():
            finished.add_metric(list(parse_label(label, 3)), float(count))
        yield finished

        yield self._run_seconds()

        depth = GaugeMetricFamily("fleet_queue_depth", "Messages waiting in a queue", labels=["queue"])
        queues = [q for c in VramClass for q in class_queues(c)] + [WEBHOOK_QUEUE]
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            pipe.scard(self.keys.running)
            pipe.llen(self.keys.dead_letters)
            *lengths, running, dead = pipe.execute()
        for queue, length in zip(queues, lengths, strict=True):
            depth.add_metric([queue], float(length))
        yield depth
        yield GaugeMetricFamily("fleet_jobs_running", "Jobs some worker holds", value=float(running))
        yield GaugeMetricFamily(
            "fleet_dead_letters", "Jobs given up after too many attempts", value=float(dead)
        )
        yield from self._workers()
        yield from self._loads()
        if self.per_tenant:
            yield from self._tenants()
        if self.budgets:
            yield from self._budgets()
        yield from self._replication()

    def _replication(self) -> Iterator[Any]:
        # Alert on fleet_redis_replicas < fleet_redis_min_replicas before submits are refused.
        try:
            info = self.client.info("replication")
        except redis.ResponseError:  # a managed Redis that refuses INFO: this gauge is left out
            info = None
        if info is not None:
            online = sum(
                1
                for name, replica in info.items()
                if name.startswith("slave") and isinstance(replica, dict) and replica.get("state") == "online"
            )
            yield GaugeMetricFamily(
                "fleet_redis_replicas",
                "Replicas in sync with the master the fleet writes to",
                value=float(online),
            )
        yield GaugeMetricFamily(
            "fleet_redis_min_replicas",
            "Replicas a submit waits for (FLEET_REDIS_MIN_REPLICAS); below it, submits are answered 503",
            value=float(self.min_replicas),
        )

    def _tenants(self) -> Iterator[Any]:
        labels = ["tenant", "model", "class", "status"]
        jobs = CounterMetricFamily(
            "fleet_tenant_jobs_finished", "A tenant's jobs that reached a final state", labels=labels
        )
        gpu_s = CounterMetricFamily(
            "fleet_tenant_gpu_seconds",
            "GPU-seconds of a tenant's ended jobs: the time the ending attempt held its worker, times the class's GPUs",
            labels=labels,
        )
        for label, value in sorted(_hash(self.client, self.keys.metrics("tenants")).items()):
            tenant, model, vram_class, status, measure = parse_label(label, 5)
            if measure == "jobs":
                jobs.add_metric([tenant, model, vram_class, status], float(value))
            else:
                seconds = float(value) * VramClass(vram_class).gpus
                gpu_s.add_metric([tenant, model, vram_class, status], seconds)
        yield jobs
        yield gpu_s

    def _budgets(self) -> Iterator[Any]:
        # Alert on fleet_tenant_month_gpu_seconds / fleet_tenant_gpu_budget_seconds before the
        # tenant's submits are refused (402).
        budget = GaugeMetricFamily(
            "fleet_tenant_gpu_budget_seconds",
            "A tenant's GPU-seconds for a UTC month (gpu_s_per_month in FLEET_TENANTS)",
            labels=["tenant"],
        )
        used = GaugeMetricFamily(
            "fleet_tenant_month_gpu_seconds",
            "GPU-seconds of a tenant's jobs that ended this UTC month, which its budget counts",
            labels=["tenant"],
        )
        for tenant, seconds in sorted(self.budgets.items()):
            budget.add_metric([tenant], seconds)
            used.add_metric([tenant], month_gpu_s(self.client, self.keys, tenant))
        yield budget
        yield used

    def _loads(self) -> Iterator[Any]:
        seconds = CounterMetricFamily(
            "fleet_model_load_seconds",
            "Seconds loading models: reading the weights, moving them to the device",
            labels=["model", "class", "phase"],
        )
        loads = CounterMetricFamily(
            "fleet_model_loads", "Models loaded (cold starts)", labels=["model", "class"]
        )
        for label, value in sorted(_hash(self.client, self.keys.metrics("load_s")).items()):
            model, vram_class, what = parse_label(label, 3)
            if what == "count":
                loads.add_metric([model, vram_class], float(value))
            else:
                seconds.add_metric([model, vram_class, what], float(value))
        yield seconds
        yield loads

    def _run_seconds(self) -> HistogramMetricFamily:
        histogram = HistogramMetricFamily(
            "fleet_job_run_seconds", "Run time of succeeded jobs, claim to finish", labels=["model", "class"]
        )
        raw = _hash(self.client, self.keys.metrics("run_s"))
        labels = {parse_label(k)[:2] for k in raw}
        for model, vram_class in sorted(labels):
            field = partial(encode_label, model, vram_class)
            buckets = [(str(b), float(raw.get(field("le", str(b)), 0))) for b in RUN_S_BUCKETS]
            count = float(raw.get(field("count"), 0))
            histogram.add_metric(
                [model, vram_class], buckets + [("+Inf", count)], sum_value=float(raw.get(field("sum"), 0))
            )
        return histogram

    def _workers(self) -> Iterator[Any]:
        states = worker_states(self.client, self.keys)
        workers = GaugeMetricFamily("fleet_workers", "Live worker processes", labels=["class"])
        for vram_class in VramClass:
            workers.add_metric(
                [vram_class.value], float(sum(s["class"] == vram_class.value for s in states.values()))
            )
        yield workers
        resident = GaugeMetricFamily(
            "fleet_resident_models", "Models resident in a worker", labels=["worker", "model"]
        )
        memory = GaugeMetricFamily(
            "fleet_worker_gpu_memory_bytes", "GPU memory torch has allocated", labels=["worker"]
        )
        busy = CounterMetricFamily(
            "fleet_gpu_busy_seconds",
            "Seconds the worker's GPU spent inside pipeline calls",
            labels=["worker", "class"],
        )
        work = CounterMetricFamily(
            "fleet_gpu_work_seconds",
            "Seconds the worker had work: held a job, or the job it took next was waiting",
            labels=["worker", "class"],
        )
        for name, state in sorted(states.items()):
            for model in state.get("resident", []):
                resident.add_metric([name, model], 1.0)
            if "gpu_memory_bytes" in state:
                memory.add_metric([name], float(state["gpu_memory_bytes"]))
            if "gpu_busy_s" in state:
                busy.add_metric([name, state["class"]], float(state["gpu_busy_s"]))
                work.add_metric([name, state["class"]], float(state["gpu_work_s"]))
        yield resident
        yield memory
        yield busy
        yield work
