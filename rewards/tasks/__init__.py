"""Task families: generators of single-turn tasks with a held-out split, the reward that scores them, and a
demonstration of a good answer for the warm-up (supervised training before RL).

    family = load_task_family("factuality_qa")
    tasks = family.generate("train", 100, seed=0)     # rewards.envs.Task: prompt messages, data = the label
    family.reward, family.reward_kwargs                # what scores a response to them (a registered reward)
    family.demonstrate(tasks[0])                       # the response the warm-up teaches, or None (not taught)

Agent environments with a task generator (rewards/envs) are task families too, of episodes: the data loader's
`tasks` format takes either kind by name (rollout/data), and an environment may register a `demonstrate(task)`
that returns the whole conversation after the prompt.

Built-in families (rewards/tasks/builtin): `factuality_qa` (a synthetic fact base, some questions unanswerable)
and `coding_fn` (short functions checked by unit tests in the sandbox). This package imports nothing outside
rewards/."""
from rewards.tasks.registry import TaskFamily, load_task_family, register_task_family, registered_task_families

__all__ = ["TaskFamily", "load_task_family", "register_task_family", "registered_task_families"]
