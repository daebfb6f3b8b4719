"""Models: CLIP teachers (teachers.py, fit.py, cache.py, prompts.py) and students (students.py).

Submodules are imported on demand so that importing one side never pulls in the other."""
