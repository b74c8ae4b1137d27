"""The command line: the commands, the console, the pre-flight check, the demo."""
