#!/bin/bash
# EC2 user data for the weft ECS demo (setup.sh fills in the cluster name and
# where to download weft). Installs weft beside the ECS agent on the ECS-optimized AMI:
# weft discovers its peers through the instance's Auto Scaling group, attaches
# every container Docker starts, serves weave.local DNS on the docker0 bridge,
# and the ECS agent talks to Docker through weft's proxy (DNS settings and
# weft-wait on every container it creates).
set -euo pipefail
mkdir -p /etc/ecs
cat >> /etc/ecs/ecs.config <<CONF
ECS_CLUSTER=@CLUSTER@
DOCKER_HOST=unix:///var/run/weft/weft.sock
CONF
curl -fsSL --retry 10 --retry-delay 3 -o /usr/local/bin/weft '@WEFT_URL@'
chmod 755 /usr/local/bin/weft
cat > /etc/default/weft <<CONF
WEFT_DISCOVERY=aws-asg
WEFT_ECS_CLUSTER=@CLUSTER@
WEFT_OPTS="--dns-listen-address 172.17.0.1:53 --hostname-from-label com.amazonaws.ecs.container-name"
CONF
cat > /etc/systemd/system/weft.service <<'UNIT'
[Unit]
Description=weft container network agent
After=network-online.target docker.service
Wants=network-online.target
Before=ecs.service

[Service]
EnvironmentFile=-/etc/default/weft
ExecStart=/usr/local/bin/weft launch $WEFT_OPTS
ExecStop=/usr/local/bin/weft stop
Restart=on-failure
RestartSec=2
LimitMEMLOCK=infinity
StateDirectory=weft

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now weft.service
