# Shared by setup.sh and cleanup.sh: names, options, the aws wrapper.
# shellcheck shell=bash

NAME=${WEFT_ECS_NAME:-weft-ecs-demo}
CLUSTER="$NAME-cluster"
SG_NAME="$NAME"
KEY_NAME="$NAME-key"
ROLE="$NAME-role"
PROFILE="$NAME-instance-profile"
POLICY="$NAME-policy"
TEMPLATE="$NAME-launch-template"
GROUP="$NAME-group"
TASK="$NAME-task"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE="${WEFT_ECS_STATE:-$PWD/$NAME.state}"

ENDPOINT_ARGS=()
REGION_ARGS=()
COUNT=3
INSTANCE_TYPE=t3.micro
AMI=""
WEFT_BINARY=""
WEFT_URL=""
WEFT_SHA256=""
WAIT_TIMEOUT=600
VPC_CIDR=10.0.0.0/16
SUBNET_CIDR=10.0.1.0/24
KEY_FILE="$PWD/$KEY_NAME.pem"

usage() {
	cat <<USAGE
usage: $0 [--endpoint-url URL] [--region REGION] [--count N] [--instance-type TYPE]
          [--ami AMI_ID] [--weft-binary PATH | --weft-url URL --weft-sha256 HEX]
          [--wait-timeout SECONDS]
          [--key-file PATH]
USAGE
	exit 64
}

parse_args() {
	while [ $# -gt 0 ]; do
		case "$1" in
		--endpoint-url) ENDPOINT_ARGS=(--endpoint-url "$2"); shift 2 ;;
		--region) REGION_ARGS=(--region "$2"); shift 2 ;;
		--count) COUNT=$2; shift 2 ;;
		--instance-type) INSTANCE_TYPE=$2; shift 2 ;;
		--ami) AMI=$2; shift 2 ;;
		--weft-binary) WEFT_BINARY=$2; shift 2 ;;
		--weft-url) WEFT_URL=$2; shift 2 ;;
		--weft-sha256) WEFT_SHA256=$2; shift 2 ;;
		--wait-timeout) WAIT_TIMEOUT=$2; shift 2 ;;
		--key-file) KEY_FILE=$2; shift 2 ;;
		-h | --help) usage ;;
		*) echo "unknown option: $1" >&2; usage ;;
		esac
	done
}

# aws with the endpoint and region options; text output.
awsx() {
	aws "${ENDPOINT_ARGS[@]}" "${REGION_ARGS[@]}" --output text "$@"
}

# Prints "what .. " now and "done" when the command that follows succeeds.
step() {
	printf '%s .. ' "$1"
}

done_() {
	echo "${1:-done}"
}

# Polls "$@" (which prints a number) until it prints $want, up to WAIT_TIMEOUT seconds.
wait_for() {
	local want=$1; shift
	local deadline=$((SECONDS + WAIT_TIMEOUT)) got
	while :; do
		got=$("$@" 2>/dev/null || true)
		[ "$got" = "$want" ] && return 0
		if [ $SECONDS -ge $deadline ]; then
			echo "timed out after ${WAIT_TIMEOUT}s (last: ${got:-nothing}, want $want)" >&2
			return 1
		fi
		sleep 2
	done
}

save_state() {
	echo "$1=$2" >>"$STATE"
}

load_state() {
	[ -f "$STATE" ] && grep -m1 "^$1=" "$STATE" | cut -d= -f2- || true
}

# The instances' user data: data/user-data.sh with the cluster, where weft comes
# from, its SHA-256 and the systemd unit (deploy/weft.service) filled in. Plain
# string replacement: no character of the values is special.
user_data() {
	local t unit
	t=$(<"$HERE/data/user-data.sh")
	unit=$(<"$HERE/../weft.service")
	shopt -u patsub_replacement 2>/dev/null || true
	t=${t//@CLUSTER@/$1}
	t=${t//@WEFT_SOURCE@/$2}
	t=${t//@WEFT_SHA256@/$3}
	t=${t//@WEFT_UNIT@/$unit}
	printf '%s\n' "$t"
}
