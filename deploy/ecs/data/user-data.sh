#!/bin/bash
# EC2 user data for the weft ECS demo (setup.sh fills in the cluster name, where
# to fetch weft and its SHA-256). Installs weft beside the ECS agent on the
# ECS-optimized AMI: weft finds its peers through the instance's Auto Scaling
# group (no peer list, no consensus number: the group's size sizes IPAM's first
# agreement), attaches every container Docker starts, serves weave.local DNS on
# the docker0 bridge (as soon as Docker has made it), and the ECS agent talks to
# Docker through weft's proxy (DNS settings and weft-wait on every container).
set -euo pipefail
WEFT_SOURCE='@WEFT_SOURCE@'
WEFT_SHA256='@WEFT_SHA256@'

# The binary: an S3 object the instance role may read (durable: instances the
# group launches months later fetch it too), or an https URL; checked before use.
fetch() {
	case "$WEFT_SOURCE" in
	s3://*)
		command -v aws >/dev/null || dnf install -y awscli-2 >/dev/null 2>&1 || yum install -y awscli >/dev/null 2>&1
		aws s3 cp --only-show-errors "$WEFT_SOURCE" /usr/local/bin/weft.new ;;
	*) curl -fsSL --retry 10 --retry-delay 3 -o /usr/local/bin/weft.new "$WEFT_SOURCE" ;;
	esac
}
for try in 1 2 3 4 5 6 7 8 9 10; do
	fetch && break
	echo "weft: download failed (try $try); retrying" >&2
	sleep 5
done
echo "$WEFT_SHA256  /usr/local/bin/weft.new" | sha256sum -c - || {
	echo "weft: the downloaded binary does not match SHA-256 $WEFT_SHA256; not installing it" >&2
	exit 1
}
chmod 755 /usr/local/bin/weft.new
mv /usr/local/bin/weft.new /usr/local/bin/weft

mkdir -p /etc/ecs
cat >> /etc/ecs/ecs.config <<CONF
ECS_CLUSTER=@CLUSTER@
DOCKER_HOST=unix:///var/run/weft/weft.sock
CONF
cat > /etc/default/weft <<CONF
WEFT_DISCOVERY=aws-asg
WEFT_ECS_CLUSTER=@CLUSTER@
WEFT_OPTS="--dns-listen-address 172.17.0.1:53 --hostname-from-label com.amazonaws.ecs.container-name"
CONF
cat > /etc/systemd/system/weft.service <<'UNIT'
@WEFT_UNIT@
UNIT
# The ECS agent's bind mount of weft's Docker socket dies with the socket when
# weft restarts: restart the ECS agent with weft (tasks keep running).
mkdir -p /etc/systemd/system/ecs.service.d
cat > /etc/systemd/system/ecs.service.d/weft.conf <<'UNIT'
[Unit]
After=weft.service
Wants=weft.service
PartOf=weft.service
UNIT
systemctl daemon-reload
# --no-block: user data runs inside cloud-final, which ecs.service is ordered after.
systemctl enable --now --no-block weft.service
