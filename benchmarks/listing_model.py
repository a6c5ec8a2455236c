"""The cost model of listing an S3 prefix: LIST requests, rounds of round trips, and time.

S3 returns at most 1,000 keys (or common prefixes) per LIST request, and a listing's next page can only
be asked for once the previous one has arrived. So:
- a sequential listing of N objects is ceil(N / 1000) requests, one round trip each, one after the other;
- `catalog.list_images` lists the top level (ceil(entries / 1000) requests, in sequence), then every
  label folder as its own sequence of ceil(n / 1000) requests (at least 1), with `concurrency` folders
  in flight; a thread takes the next folder as soon as it is done with one, in folder order. Above
  `max_folder_listings` folders it first lists a sample of `concurrency` folders, and lists the root
  flat when they are small (`catalog_listing` below follows the same rules).
A round is one round trip. Time is modelled as rounds x latency + client CPU per object x objects: the
CPU term is counted in full as if it never overlapped with waiting, so the model errs on the slow side.
Pure Python, no dependencies: the benchmark imports it, and it can be read on its own.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from math import ceil

PAGE = 1000
AWS_LIST_SECONDS = 0.05  # a LIST round trip against S3 from the same region, as the issue assumes


def pages(keys: int) -> int:
    """LIST requests to list `keys` keys: at least one, even for an empty folder."""
    return max(1, ceil(keys / PAGE))


def folder_sizes(objects: int, labels: int) -> list[int]:
    """`objects` spread as evenly as possible over `labels` folders."""
    base, extra = divmod(objects, labels)
    return [base + (1 if index < extra else 0) for index in range(labels)]


def greedy_rounds(chains: list[int], workers: int) -> int:
    """Rounds to run sequences of `chains[i]` requests each with `workers` threads, each thread taking
    the next sequence in order as soon as it is free (what a ThreadPoolExecutor does)."""
    free_at = [0] * min(workers, len(chains))
    heapq.heapify(free_at)
    end = 0
    for chain in chains:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + chain)
        end = max(end, start + chain)
    return end


@dataclass(frozen=True)
class Plan:
    """Requests and rounds of one listing."""

    requests: int
    rounds: int

    def seconds(self, latency: float, cpu_per_object: float, objects: int) -> float:
        return self.rounds * latency + cpu_per_object * objects


def sequential(objects: int) -> Plan:
    """The listing before issue 17: one flat listing of the whole prefix."""
    return Plan(requests=pages(objects), rounds=pages(objects))


def per_folder(sizes: list[int], concurrency: int, top_entries: int | None = None) -> Plan:
    """`catalog.list_images` folder by folder: the top level, then the folders in parallel."""
    top = pages(len(sizes) if top_entries is None else top_entries)
    chains = [pages(size) for size in sizes]
    return Plan(requests=top + sum(chains), rounds=top + greedy_rounds(chains, concurrency))


def catalog_listing(
    sizes: list[int], concurrency: int, max_folder_listings: int = 1000, min_mean_folder_keys: int = 500, top_entries: int | None = None
) -> tuple[Plan, bool]:
    """(plan, listed flat) of `catalog.list_images` on folders of `sizes` keys, in folder name order;
    `top_entries`: entries at the top level, if there are more than the folders (stray files...)."""
    if len(sizes) <= max_folder_listings:
        return per_folder(sizes, concurrency, top_entries), False
    top = pages(len(sizes) if top_entries is None else top_entries)
    sampled = set(range(0, len(sizes), max(1, len(sizes) // concurrency))[:concurrency])
    sample = [pages(sizes[index]) for index in sorted(sampled)]
    sample_rounds = greedy_rounds(sample, concurrency)
    if sum(sizes[index] for index in sampled) < min_mean_folder_keys * len(sampled):
        objects = sum(sizes)
        return Plan(requests=top + sum(sample) + pages(objects), rounds=top + sample_rounds + pages(objects)), True
    rest = [pages(size) for index, size in enumerate(sizes) if index not in sampled]
    plan = Plan(requests=top + sum(sample) + sum(rest), rounds=top + sample_rounds + greedy_rounds(rest, concurrency))
    return plan, False
