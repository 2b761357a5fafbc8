"""Gradient reducers that sum with MPI Allreduce on the flat buffer, in place.

- AllreduceReducer: one Allreduce of the whole buffer after backward.
  Collectives per step: Allreduce(buffer).
- BucketedAllreduce: the buffer (laid out in the order backward finishes the parameters)
  is cut into buckets of about bucket_bytes; where the communicator allows another
  thread to make collectives, a worker thread reduces each bucket on a duplicate
  communicator as soon as its last entry is ready, while backward goes on with earlier
  layers; the last bucket carries [loss, stop vote] and is reduced at reduce().
  Collectives per step: Allreduce(bucket 0), ..., Allreduce(bucket B-1), in that order,
  on the duplicate communicator (without a worker: one Allreduce(buffer) on comm).
  Overlap pays where the reduction does not compete with backward for the same cores
  and memory bandwidth (other nodes, a network); on one 2-core machine it measured slower.

Every rank holds its own copy of the parameters and finishes every entry of the sum.
"""

import bisect
import queue
import threading

from .reducer import Reducer, finish_all


class AllreduceReducer(Reducer):
    name = "allreduce"

    def __init__(self, comm, buffer):
        loss_range = (0, len(buffer)) if comm.rank == 0 else (0, 0)
        super().__init__(buffer, buffer, (0, len(buffer)), loss_range)
        self.comm = comm

    def describe(self):
        return "one Allreduce after backward"

    def reduce(self, finish=None):
        self.comm.allreduce(self.result)
        finish_all(self.result, finish, *self.owned)
        return self.result


class BucketedAllreduce(AllreduceReducer):
    """Inputs: comm; buffer (count,); bounds: the buckets' [start, stop) in buffer order,
    tiling it, the last ending at count."""

    name = "buckets"

    def __init__(self, comm, buffer, bounds):
        super().__init__(comm, buffer)
        self.buckets = list(bounds)
        self._starts = [start for start, _ in self.buckets]
        self.begin()
        self.overlapped = len(self.buckets) > 1 and comm.size > 1 and comm.thread_multiple
        self._worker = None
        if self.overlapped:
            self._bucket_comm = comm.dup()
            self._queue = queue.Queue()
            self._failure = None
            self._worker = threading.Thread(target=self._reduce_buckets, name="dpnet-allreduce", daemon=True)
            self._worker.start()

    def describe(self):
        how = "overlapped with backward" if self.overlapped else "after backward"
        return f"Allreduce in {len(self.buckets)} buckets, {how}"

    def begin(self):
        self._pending = [stop - start for start, stop in self.buckets]

    def ready(self, lo, hi):
        b = bisect.bisect_right(self._starts, lo) - 1
        self._pending[b] -= hi - lo
        if self._pending[b] == 0 and b < len(self.buckets) - 1 and self.overlapped:
            self._queue.put(self.buckets[b])

    def reduce(self, finish=None):
        if not self.overlapped:  # one Allreduce of the whole buffer
            return super().reduce(finish)
        self._queue.put(self.buckets[-1])
        self._queue.join()  # every bucket of this step reduced
        if self._failure is not None:
            raise self._failure
        finish_all(self.result, finish, *self.owned)
        return self.result

    def _reduce_buckets(self):
        while True:
            bucket = self._queue.get()
            try:
                if bucket is None:
                    return
                if self._failure is None:
                    self._bucket_comm.allreduce(self.result[bucket[0]:bucket[1]])
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                self._failure = exc
            finally:
                self._queue.task_done()

    def close(self):
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
            self._bucket_comm.free()
            self.overlapped = False


def bucket_bounds(ends, count, bucket_bytes, itemsize):
    """[(start, stop)] buckets of a flat buffer of `count` entries whose parameters end at
    `ends` (in buffer order): each bucket at least bucket_bytes except the last, which also
    takes the entries after the parameters."""
    bounds, start = [], 0
    for stop in ends:
        if (stop - start) * itemsize >= bucket_bytes:
            bounds.append((start, stop))
            start = stop
    if bounds and start == ends[-1]:
        bounds[-1] = (bounds[-1][0], count)  # the last parameter closed a bucket: give it the tail
    else:
        bounds.append((start, count))
    return bounds
