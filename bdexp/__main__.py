"""`python -m bdexp` = `bdexp` (the task function stays importable as bdexp.cli._main, which
joblib/submitit workers need to unpickle it by reference)."""
from bdexp.cli import main

main()
