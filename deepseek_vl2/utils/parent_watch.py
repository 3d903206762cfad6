"""Child processes that hold a GPU end with the process that started them."""
import multiprocessing
import os
import threading


def end_with_parent() -> None:
    """In a `multiprocessing` child: end this process when its parent ends, however the parent ends
    (killed with SIGKILL too, even before this child ran), from a daemon thread that waits on the
    parent's sentinel. A child left running would hold its GPU's memory, and nothing reads its pipes."""
    def wait_and_exit():
        multiprocessing.parent_process().join()
        os._exit(1)

    threading.Thread(target=wait_and_exit, name="parent-watch", daemon=True).start()
