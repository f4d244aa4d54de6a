#!/bin/sh
# Example key classes, after the original deployment's agent types: opus agents may run
# at priority 2 at most urgent and send 10 requests a minute; sonnet agents 20 a minute.
# Nothing here is a default: run it (with CORRAL_REDIS_URL set) to create them, then
# `corral keys add --class opus --id agent-1` for each agent.
set -e
corral keys class opus --priority-ceiling 2 --key-rpm 10 --num-predict-max 8192 \
    --quota-bytes 67108864
corral keys class sonnet --priority-ceiling 3 --key-rpm 20 --num-predict-max 4096 \
    --quota-bytes 33554432
corral keys classes
