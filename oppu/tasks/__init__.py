"""Task registry: the seven LaMP tasks, plus any task a user registers.

    from oppu.tasks import get_task, register
    task = get_task("LaMP_2M")
"""
from oppu.tasks.base import Task, get_task, register, registered  # noqa: F401
from oppu.tasks import lamp_2m

for _m in (lamp_2m,):
    register(_m.TASK)
