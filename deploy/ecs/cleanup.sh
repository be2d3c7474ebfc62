#!/usr/bin/env bash
# Removes everything setup.sh created (found by name, and through the state
# file setup.sh wrote for the security group and the S3 bucket). Safe to run
# again: what is already gone is skipped.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_args "$@"
command -v aws >/dev/null || { echo "the AWS CLI is missing: https://aws.amazon.com/cli/" >&2; exit 1; }
failed=0

# Runs a cleanup command; "not found" answers are fine, anything else is reported.
try() {
	local out
	if ! out=$("$@" 2>&1); then
		case "$out" in
		*NotFound* | *NoSuch* | *"does not exist"* | *"not found"* | *InvalidGroup.NotFound* | *ClusterNotFound* | *ServiceNotFound* | *ValidationError*"not found"*) ;;
		*) echo "  $*: $out" >&2; failed=1 ;;
		esac
	fi
}

step "Deleting services"
for svc in hit-counter redis; do
	try awsx ecs update-service --cluster "$CLUSTER" --service "$svc" --desired-count 0
	try awsx ecs delete-service --cluster "$CLUSTER" --service "$svc" --force
done
done_

step "Stopping tasks"
for t in $(awsx ecs list-tasks --cluster "$CLUSTER" --query 'taskArns[]' 2>/dev/null); do
	[ "$t" = None ] || try awsx ecs stop-task --cluster "$CLUSTER" --task "$t"
done
done_

step "Deregistering task definitions"
for family in "$TASK" "$NAME-hit-counter" "$NAME-redis"; do
	for td in $(awsx ecs list-task-definitions --family-prefix "$family" --status ACTIVE --query 'taskDefinitionArns[]' 2>/dev/null); do
		[ "$td" = None ] || try awsx ecs deregister-task-definition --task-definition "$td"
	done
done
done_

step "Deleting Auto Scaling Group ($GROUP)"
IDS=$(awsx autoscaling describe-auto-scaling-groups --auto-scaling-group-names "$GROUP" --query 'AutoScalingGroups[0].Instances[].InstanceId' 2>/dev/null || true)
try awsx autoscaling delete-auto-scaling-group --auto-scaling-group-name "$GROUP" --force-delete
if [ -n "$IDS" ] && [ "$IDS" != None ]; then
	# shellcheck disable=SC2086
	try awsx ec2 terminate-instances --instance-ids $IDS
	# shellcheck disable=SC2086
	try awsx ec2 wait instance-terminated --instance-ids $IDS
fi
done_

step "Deleting Launch Template ($TEMPLATE)"
try awsx ec2 delete-launch-template --launch-template-name "$TEMPLATE"
done_

step "Deleting ECS cluster ($CLUSTER)"
for ci in $(awsx ecs list-container-instances --cluster "$CLUSTER" --query 'containerInstanceArns[]' 2>/dev/null); do
	[ "$ci" = None ] || try awsx ecs deregister-container-instance --cluster "$CLUSTER" --container-instance "$ci" --force
done
try awsx ecs delete-cluster --cluster "$CLUSTER"
done_

step "Deleting weft's S3 bucket"
for bucket in $(load_state bucket); do
	try awsx s3 rb "s3://$bucket" --force
done
done_

step "Deleting IAM role ($ROLE) and instance profile ($PROFILE)"
try awsx iam remove-role-from-instance-profile --instance-profile-name "$PROFILE" --role-name "$ROLE"
try awsx iam delete-instance-profile --instance-profile-name "$PROFILE"
try awsx iam delete-role-policy --role-name "$ROLE" --policy-name "$POLICY"
try awsx iam delete-role-policy --role-name "$ROLE" --policy-name "$POLICY-binary"
try awsx iam delete-role --role-name "$ROLE"
done_

step "Deleting Key Pair ($KEY_NAME)"
try awsx ec2 delete-key-pair --key-name "$KEY_NAME"
rm -f "$KEY_FILE"
done_

step "Deleting Security Group ($SG_NAME)"
SG=$(load_state security_group)
[ -n "$SG" ] || SG=$(awsx ec2 describe-security-groups --filters "Name=group-name,Values=$SG_NAME" --query 'SecurityGroups[0].GroupId' 2>/dev/null || true)
if [ -n "$SG" ] && [ "$SG" != None ]; then
	try awsx ec2 delete-security-group --group-id "$SG"
fi
done_

step "Deleting VPC (route table, internet gateway, subnet)"
VPC=$(load_state vpc)
[ -n "$VPC" ] || VPC=$(awsx ec2 describe-vpcs --filters "Name=tag:Name,Values=$NAME" --query 'Vpcs[0].VpcId' 2>/dev/null || true)
if [ -n "$VPC" ] && [ "$VPC" != None ]; then
	for rt in $(load_state route_table); do
		for assoc in $(awsx ec2 describe-route-tables --route-table-ids "$rt" --query 'RouteTables[0].Associations[].RouteTableAssociationId' 2>/dev/null); do
			[ "$assoc" = None ] || try awsx ec2 disassociate-route-table --association-id "$assoc"
		done
		try awsx ec2 delete-route-table --route-table-id "$rt"
	done
	for igw in $(load_state internet_gateway); do
		try awsx ec2 detach-internet-gateway --internet-gateway-id "$igw" --vpc-id "$VPC"
		try awsx ec2 delete-internet-gateway --internet-gateway-id "$igw"
	done
	for subnet in $(load_state subnet); do
		try awsx ec2 delete-subnet --subnet-id "$subnet"
	done
	try awsx ec2 delete-vpc --vpc-id "$VPC"
fi
done_

rm -f "$STATE"
if [ "$failed" = 0 ]; then
	echo "Cleanup is done."
else
	echo "Cleanup left something behind (see above); run it again once AWS has caught up." >&2
	exit 1
fi
