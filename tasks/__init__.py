"""Training problems, one subpackage per task, named by the config's `task.name`.

The config names the Task class: `task.name = 'tasks.<task>.task:<Class>'`.

Each task package has the same parts:
  data.py          generation / loading / augmentation (numpy + grain; no model, no trainer)
  tfds_builder.py  the tfds builder that stores generated or downloaded data (where there is one)
  metrics.py       task metrics as pure functions of model outputs (where they need a module)
  task.py          the glue: a `train_lib.task.Task` subclass (config validation, model, loss)
RL (tasks/ctm_rl) has no dataset: envs.py (JAX environments), agent.py and ppo.py (the algorithm)
take data.py's place, and its task supplies its own train step (`Task.make_train_step`).
"""
