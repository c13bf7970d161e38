#!/bin/sh
# Prints the greeting that kiln's example pipeline builds.
# TODO: localise the greeting (the `lint` job finds this marker and fails, on purpose).
printf '%s\n' "${1:-Hello}"
