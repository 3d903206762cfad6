"""Events from the engine's thread reach the event loop in order, a burst with one wake-up
(serve/scheduler.py `EventRelay`)."""
import asyncio
import threading

from deepseek_vl2.engine import GenerationParams
from deepseek_vl2.serve.scheduler import Job, relay_for


def test_a_burst_of_events_wakes_the_loop_once_and_arrives_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups, call_soon_threadsafe = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wakeups.append(args), call_soon_threadsafe(*args))[1]
        jobs = [Job(None, GenerationParams(), loop) for _ in range(3)]

        def decode_steps():  # the engine's thread: every row's text, step after step
            for step in range(50):
                for row, job in enumerate(jobs):
                    job.emit("text", f"{row}:{step}")

        thread = threading.Thread(target=decode_steps)
        thread.start()
        thread.join()  # the loop is busy meanwhile
        assert len(wakeups) == 1 and all(job.events.empty() for job in jobs)
        await asyncio.sleep(0)
        for row, job in enumerate(jobs):
            assert [job.events.get_nowait() for _ in range(50)] == [("text", f"{row}:{step}") for step in range(50)]
            assert job.events.empty()
        jobs[1].emit("done", "result")  # delivered: the next event wakes the loop again
        await asyncio.sleep(0)
        assert len(wakeups) == 2 and jobs[1].events.get_nowait() == ("done", "result")
        assert relay_for(loop) is jobs[0].relay is jobs[2].relay
        return jobs

    jobs = asyncio.run(main())
    jobs[0].emit("text", "after the loop closed")  # dropped without an error: nobody waits
