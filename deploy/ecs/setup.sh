#!/usr/bin/env bash
# Builds the weft ECS demo (what the Weave ECS guide's setup.sh did, with weft):
# an ECS cluster, its own VPC (10.0.0.0/16, a public subnet, an internet gateway
# and a default route: accounts without a default VPC work too), a security group (TCP 6783 and UDP 6783-6784 between members;
# 22 and 80 public), a key pair, an IAM role and instance profile, a launch
# template whose user data installs and starts weft beside the ECS agent, an
# Auto Scaling group of 3, the task definitions (the guide's dataproducer and
# httpserver; the hit-counter and redis services), then runs them and prints
# the URLs. cleanup.sh removes all of it.
#
# Needs the AWS CLI and credentials. The weft binary (built with
# `cargo build --release --features aws`; a binary without it is refused) is
# uploaded to a new S3 bucket that the instance role may read, so instances the
# group launches later (replacements, scale-out) fetch it too; its SHA-256 is
# checked on the instance before it is installed. Or pass --weft-url with
# --weft-sha256 (an https URL that stays valid as long as the group runs).
# --endpoint-url is passed to every AWS call (tests run this against moto).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args "$@"

command -v aws >/dev/null || { echo "the AWS CLI is missing: https://aws.amazon.com/cli/" >&2; exit 1; }
if [ -z "$WEFT_URL" ]; then
	if [ -z "$WEFT_BINARY" ]; then
		WEFT_BINARY="${CARGO_TARGET_DIR:-$HERE/../../target}/release/weft"
	fi
	[ -x "$WEFT_BINARY" ] || {
		echo "no weft binary at $WEFT_BINARY: run 'cargo build --release --features aws' or pass --weft-binary/--weft-url" >&2
		exit 1
	}
	# The instances find each other with --discovery aws-asg: a build without
	# the aws feature would exit at once on every one of them.
	features=$("$WEFT_BINARY" --version 2>/dev/null | sed -n 's/^features: //p')
	case " $features " in
	*" aws "*) ;;
	*)
		echo "$WEFT_BINARY was built without the aws feature (its --version says features: ${features:-nothing});" >&2
		echo "the instances need it for --discovery aws-asg: build with 'cargo build --release --features aws'" >&2
		exit 1
		;;
	esac
	WEFT_SHA256=$(sha256sum "$WEFT_BINARY" | cut -d' ' -f1)
elif [ -z "$WEFT_SHA256" ]; then
	echo "--weft-url needs --weft-sha256 (sha256sum of the binary): the instances check it before installing" >&2
	exit 64
fi
: >"$STATE"

step "Creating ECS cluster ($CLUSTER)"
awsx ecs create-cluster --cluster-name "$CLUSTER" >/dev/null
done_

step "Creating VPC ($VPC_CIDR, subnet $SUBNET_CIDR, internet gateway, route)"
VPC=$(awsx ec2 create-vpc --cidr-block "$VPC_CIDR" --query Vpc.VpcId)
save_state vpc "$VPC"
awsx ec2 create-tags --resources "$VPC" --tags "Key=Name,Value=$NAME"
awsx ec2 modify-vpc-attribute --vpc-id "$VPC" --enable-dns-hostnames '{"Value": true}'
SUBNET=$(awsx ec2 create-subnet --vpc-id "$VPC" --cidr-block "$SUBNET_CIDR" --query Subnet.SubnetId)
save_state subnet "$SUBNET"
awsx ec2 modify-subnet-attribute --subnet-id "$SUBNET" --map-public-ip-on-launch
IGW=$(awsx ec2 create-internet-gateway --query InternetGateway.InternetGatewayId)
save_state internet_gateway "$IGW"
awsx ec2 create-tags --resources "$IGW" --tags "Key=Name,Value=$NAME"
awsx ec2 attach-internet-gateway --internet-gateway-id "$IGW" --vpc-id "$VPC"
RT=$(awsx ec2 create-route-table --vpc-id "$VPC" --query RouteTable.RouteTableId)
save_state route_table "$RT"
awsx ec2 create-route --route-table-id "$RT" --destination-cidr-block 0.0.0.0/0 --gateway-id "$IGW" >/dev/null
awsx ec2 associate-route-table --route-table-id "$RT" --subnet-id "$SUBNET" >/dev/null
done_ "done ($VPC)"

step "Creating Security Group ($SG_NAME)"
SG=$(awsx ec2 create-security-group --group-name "$SG_NAME" --description "weft ECS demo" --vpc-id "$VPC" --query GroupId)
save_state security_group "$SG"
awsx ec2 authorize-security-group-ingress --group-id "$SG" --protocol tcp --port 22 --cidr 0.0.0.0/0 >/dev/null
awsx ec2 authorize-security-group-ingress --group-id "$SG" --protocol tcp --port 80 --cidr 0.0.0.0/0 >/dev/null
awsx ec2 authorize-security-group-ingress --group-id "$SG" --protocol tcp --port 8080 --cidr 0.0.0.0/0 >/dev/null
awsx ec2 authorize-security-group-ingress --group-id "$SG" --protocol tcp --port 6783 --source-group "$SG" >/dev/null
awsx ec2 authorize-security-group-ingress --group-id "$SG" --protocol udp --port 6783-6784 --source-group "$SG" >/dev/null
done_ "done ($SG)"

step "Creating Key Pair ($KEY_NAME, file $KEY_FILE)"
awsx ec2 create-key-pair --key-name "$KEY_NAME" --query KeyMaterial >"$KEY_FILE"
chmod 600 "$KEY_FILE"
done_

step "Creating IAM role ($ROLE)"
awsx iam create-role --role-name "$ROLE" --assume-role-policy-document "file://$HERE/data/weft-ecs-role.json" >/dev/null
awsx iam put-role-policy --role-name "$ROLE" --policy-name "$POLICY" --policy-document "file://$HERE/data/weft-ecs-policy.json"
awsx iam create-instance-profile --instance-profile-name "$PROFILE" >/dev/null
awsx iam add-role-to-instance-profile --instance-profile-name "$PROFILE" --role-name "$ROLE"
done_

if [ -z "$WEFT_URL" ]; then
	BUCKET="$NAME-$(date +%s)-$RANDOM"
	step "Uploading weft ($(du -h "$WEFT_BINARY" | cut -f1)) to s3://$BUCKET"
	save_state bucket "$BUCKET"
	awsx s3 mb "s3://$BUCKET" >/dev/null
	awsx s3 cp "$WEFT_BINARY" "s3://$BUCKET/weft" >/dev/null
	# The instance role reads exactly this object (no URL that expires).
	cat >"$STATE.s3-policy.json" <<JSON
{"Version": "2012-10-17", "Statement": [{"Sid": "WeftBinary", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::$BUCKET/weft"}]}
JSON
	awsx iam put-role-policy --role-name "$ROLE" --policy-name "$POLICY-binary" --policy-document "file://$STATE.s3-policy.json"
	rm -f "$STATE.s3-policy.json"
	WEFT_SOURCE="s3://$BUCKET/weft"
	done_
else
	WEFT_SOURCE=$WEFT_URL
fi

if [ -z "$AMI" ]; then
	AMI=$(awsx ssm get-parameter --name /aws/service/ecs/optimized-ami/amazon-linux-2023/recommended/image_id --query Parameter.Value) || {
		echo "cannot look up the ECS-optimized AMI: pass --ami" >&2
		exit 1
	}
fi

step "Creating Launch Template ($TEMPLATE)"
USER_DATA=$(user_data "$CLUSTER" "$WEFT_SOURCE" "$WEFT_SHA256" | base64 | tr -d '\n')
cat >"$STATE.template.json" <<JSON
{
  "ImageId": "$AMI",
  "InstanceType": "$INSTANCE_TYPE",
  "KeyName": "$KEY_NAME",
  "IamInstanceProfile": {"Name": "$PROFILE"},
  "NetworkInterfaces": [{"DeviceIndex": 0, "AssociatePublicIpAddress": true, "Groups": ["$SG"]}],
  "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 2},
  "UserData": "$USER_DATA"
}
JSON
awsx ec2 create-launch-template --launch-template-name "$TEMPLATE" --launch-template-data "file://$STATE.template.json" >/dev/null
rm -f "$STATE.template.json"
done_

step "Creating Auto Scaling Group ($GROUP) with $COUNT instances"
awsx autoscaling create-auto-scaling-group --auto-scaling-group-name "$GROUP" \
	--launch-template "LaunchTemplateName=$TEMPLATE,Version=\$Latest" \
	--min-size "$COUNT" --max-size "$COUNT" --desired-capacity "$COUNT" --vpc-zone-identifier "$SUBNET" \
	--tags "Key=weft:ecs-cluster,Value=$CLUSTER,PropagateAtLaunch=true,ResourceId=$GROUP,ResourceType=auto-scaling-group" \
	"Key=Name,Value=$NAME,PropagateAtLaunch=true,ResourceId=$GROUP,ResourceType=auto-scaling-group"
done_

step "Waiting for instances to join the cluster (this may take a few minutes)"
in_service() {
	awsx autoscaling describe-auto-scaling-groups --auto-scaling-group-names "$GROUP" \
		--query 'length(AutoScalingGroups[0].Instances[?LifecycleState==`InService`])'
}
wait_for "$COUNT" in_service
wait_for "$COUNT" awsx ecs describe-clusters --clusters "$CLUSTER" --query 'clusters[0].registeredContainerInstancesCount'
done_

step "Registering ECS Task Definitions ($TASK, hit-counter, redis)"
awsx ecs register-task-definition --family "$TASK" --container-definitions "file://$HERE/data/weft-ecs-demo-containers.json" >/dev/null
awsx ecs register-task-definition --family "$NAME-hit-counter" --container-definitions "file://$HERE/data/hit-counter-containers.json" >/dev/null
awsx ecs register-task-definition --family "$NAME-redis" --container-definitions "file://$HERE/data/redis-containers.json" >/dev/null
done_

step "Launching ($COUNT) tasks and the hit-counter ($COUNT) and redis (1) services"
awsx ecs run-task --cluster "$CLUSTER" --task-definition "$TASK" --count "$COUNT" >/dev/null
awsx ecs create-service --cluster "$CLUSTER" --service-name redis --task-definition "$NAME-redis" --desired-count 1 >/dev/null
awsx ecs create-service --cluster "$CLUSTER" --service-name hit-counter --task-definition "$NAME-hit-counter" --desired-count "$COUNT" >/dev/null
done_

step "Waiting for tasks to start running"
running() {
	local tasks
	tasks=$(awsx ecs list-tasks --cluster "$CLUSTER" --family "$TASK" --query 'taskArns[]')
	# shellcheck disable=SC2086
	awsx ecs describe-tasks --cluster "$CLUSTER" --tasks $tasks --query 'length(tasks[?lastStatus==`RUNNING`])'
}
wait_for "$COUNT" running
done_ "done (the services' tasks follow: aws ecs describe-services --cluster $CLUSTER --services hit-counter redis)"

echo "Setup is ready!"
echo "Open your browser and go to any of these URLs (the hit counter is on port 8080):"
IDS=$(awsx autoscaling describe-auto-scaling-groups --auto-scaling-group-names "$GROUP" --query 'AutoScalingGroups[0].Instances[].InstanceId')
# shellcheck disable=SC2086
for dns in $(awsx ec2 describe-instances --instance-ids $IDS --query 'Reservations[].Instances[].PublicDnsName'); do
	echo "  http://$dns"
done
