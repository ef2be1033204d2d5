from unlearn.cli import entry

entry()
