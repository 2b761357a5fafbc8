"""Running a function on threads of its own, one per index: SimComm's logical ranks and the
reproducible mode's micro-shard passes."""

import threading


def run_threads(fn, count, name, on_error=None, on_success=None):
    """Call fn(i) for i in range(count), each on a thread of its own, and wait for all; returns
    (results, errors), both lists in index order (None where there is none). on_error(i, exc) is
    called as a thread fails (to wake the others), on_success(i) as one returns."""
    results, errors = [None] * count, [None] * count

    def body(i):
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors[i] = exc
            if on_error is not None:
                on_error(i, exc)
        else:
            if on_success is not None:
                on_success(i)

    threads = [threading.Thread(target=body, args=(i,), name=f"{name}-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors
