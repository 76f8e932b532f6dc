"""bgswap workers: `celery -A worker worker` finds the Celery app as `worker.app`.

The app is loaded lazily so that importing a small module (worker.jobs, say) from
the producer does not build a Celery app and read settings as a side effect.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        import worker.tasks  # noqa: F401, PLC0415 - registers the tasks on the app
        from worker.celery_app import app  # noqa: PLC0415 - lazy on purpose, see above

        return app
    raise AttributeError(name)
