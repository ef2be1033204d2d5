from unlearn.command import entry

entry()
