"""The bare flow `bench/prefect_floor.py` serves on Prefect's own Runner.

A module of its own: the Runner's process for each run imports it by its entrypoint
(``bench/floor_flow.py:bare_served``), so it imports nothing but Prefect.
"""

from prefect import flow


@flow(persist_result=True)
async def bare_served() -> int:
    return 1
