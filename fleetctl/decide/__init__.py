"""Pure decisions: facts and knowledge in, a stack, a driver move, serving settings, a proof mode, a health
verdict or a plan out, each with its reasons. Nothing here runs a command."""
