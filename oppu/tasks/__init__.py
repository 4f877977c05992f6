"""Task registry: the seven LaMP tasks, plus any task a user registers.

    from oppu.tasks import get_task, register
    task = get_task("LaMP_2M")
"""
from oppu.tasks.base import Task, get_task, register, registered  # noqa: F401
from oppu.tasks import lamp_1, lamp_2m, lamp_2n, lamp_3, lamp_4, lamp_5, lamp_7

for _m in (lamp_1, lamp_2n, lamp_2m, lamp_3, lamp_4, lamp_5, lamp_7):
    register(_m.TASK)
