"""Child processes and their process groups: starting, watching and stopping them,
and the file locks that give one directory one owner."""
