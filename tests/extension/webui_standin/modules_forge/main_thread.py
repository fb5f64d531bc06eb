"""Forge runs generation on one main thread; run_and_wait_result returns the result, or None after printing
an exception (it does not re-raise). The stand-in runs inline but keeps that behaviour."""
import threading
import traceback

last_exception = None
thread_ids = []


def run_and_wait_result(func, *args, **kwargs):
    global last_exception
    thread_ids.append(threading.get_ident())
    try:
        result = func(*args, **kwargs)
        last_exception = None
        return result
    except Exception as e:
        traceback.print_exc()
        last_exception = e
        return None
