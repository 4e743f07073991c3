"""The command-line entries the README and the design card name (`python -m src.train`,
`src.probe`, `src.replay`, `src.report`): each is a thin door into the `nanlab` package,
so existing commands, Makefiles and sweep files keep working while users import `nanlab`."""

import nanlab  # noqa: F401  (sets the offline environment before anything else loads)
