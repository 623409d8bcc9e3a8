"""Hosts as data: inventory sources (YAML, INI, directories, scripts), their vars and templating, patterns,
playbooks and vault. Nothing here runs a command or opens a connection."""
