//! `--discovery aws-asg`: the members of this instance's group, from AWS.
//!
//! The instance id and region come from the instance metadata service
//! (IMDSv2). The group is, in this order: the instances carrying the same
//! `weave:peerGroupName` tag value as this one (`--aws-peer-group-tag`); the
//! Auto Scaling groups tagged `weft:ecs-cluster` with this host's ECS cluster;
//! else this instance's own Auto Scaling group. Members are the groups'
//! InService instances that EC2 says are running; their private addresses are
//! the peers.
//!
//! IAM permissions: `autoscaling:DescribeAutoScalingInstances`,
//! `autoscaling:DescribeAutoScalingGroups`, `ec2:DescribeInstances`.
//! Endpoint overrides (tests, private endpoints): `AWS_ENDPOINT_URL`
//! (`AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL_AUTO_SCALING`) and
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aws_config::BehaviorVersion;
use aws_config::provider_config::ProviderConfig;
use aws_sdk_autoscaling::error::DisplayErrorContext;
use aws_sdk_autoscaling::types::{Filter, LifecycleState};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use tokio::sync::Mutex;
use tracing::info;

use super::ec2::{Ec2, Instance};
use super::{Found, Settings, Source, SourceError};

/// The tag an Auto Scaling group carries to belong to an ECS cluster's group.
pub const ECS_CLUSTER_TAG: &str = "weft:ecs-cluster";

/// Clients, made once the metadata service has answered.
struct Ready {
    instance_id: String,
    asg: aws_sdk_autoscaling::Client,
    ec2: Ec2,
}

pub struct AwsSource {
    settings: Settings,
    ready: Mutex<Option<Ready>>,
}

impl AwsSource {
    pub fn new(settings: Settings) -> AwsSource {
        AwsSource { settings, ready: Mutex::new(None) }
    }

    async fn connect(&self) -> Result<Ready, SourceError> {
        let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let imds = aws_config::imds::Client::builder()
            .configure(&ProviderConfig::without_region().with_http_client(http.clone()))
            .build();
        let imds_hint = |what: &str, e: &dyn std::fmt::Display| {
            SourceError(format!(
                "cannot read {what} from the instance metadata service (IMDSv2{}): {e} — is this an EC2 instance with IMDS enabled?",
                std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").map(|e| format!(" at {e}")).unwrap_or_default()
            ))
        };
        let instance_id = imds
            .get("/latest/meta-data/instance-id")
            .await
            .map_err(|e| imds_hint("the instance id", &DisplayErrorContext(&e)))?
            .as_ref()
            .to_string();
        let region = match std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION")) {
            Ok(r) if !r.is_empty() => r,
            _ => imds
                .get("/latest/meta-data/placement/region")
                .await
                .map_err(|e| imds_hint("the region", &DisplayErrorContext(&e)))?
                .as_ref()
                .to_string(),
        };
        let config = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.clone()))
            .http_client(http)
            .load()
            .await;
        let credentials = config
            .credentials_provider()
            .ok_or_else(|| SourceError("no AWS credentials provider: give the instance a role (see README: IAM permissions)".into()))?;
        let endpoint = std::env::var("AWS_ENDPOINT_URL_EC2")
            .ok()
            .or_else(|| config.endpoint_url().map(str::to_string))
            .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com"));
        let endpoint = if endpoint.ends_with('/') { endpoint } else { format!("{endpoint}/") };
        let connector = aws_smithy_http_client::Connector::builder().tls_provider(Provider::Rustls(CryptoMode::Ring)).build();
        info!(instance = %instance_id, %region, ec2 = %endpoint, "AWS discovery: this is an EC2 instance");
        Ok(Ready {
            instance_id,
            asg: aws_sdk_autoscaling::Client::new(&config),
            ec2: Ec2 { endpoint, region, credentials, connector },
        })
    }

    fn ecs_cluster(&self) -> Option<String> {
        self.settings.ecs_cluster.clone().filter(|c| !c.is_empty()).or_else(|| {
            std::fs::read_to_string("/etc/ecs/ecs.config").ok().and_then(|t| super::ecs_cluster_from_config(&t))
        })
    }
}

fn asg_err(what: &str, e: &dyn std::fmt::Display) -> SourceError {
    SourceError(format!(
        "Auto Scaling {what} failed: {e} (the instance role needs autoscaling:DescribeAutoScalingInstances and autoscaling:DescribeAutoScalingGroups)"
    ))
}

/// The groups' InService instances, names and summed desired capacity (all pages).
async fn in_service(asg: &aws_sdk_autoscaling::Client, names: Option<Vec<String>>, filter: Option<Filter>) -> Result<(Vec<String>, Vec<String>, usize), SourceError> {
    let (mut ids, mut groups, mut desired) = (Vec::new(), Vec::new(), 0usize);
    let mut token: Option<String> = None;
    loop {
        let out = asg
            .describe_auto_scaling_groups()
            .set_auto_scaling_group_names(names.clone())
            .set_filters(filter.clone().map(|f| vec![f]))
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(|e| asg_err("DescribeAutoScalingGroups", &DisplayErrorContext(&e)))?;
        for g in out.auto_scaling_groups() {
            groups.push(g.auto_scaling_group_name().unwrap_or_default().to_string());
            desired += usize::try_from(g.desired_capacity().unwrap_or(0)).unwrap_or(0);
            for i in g.instances() {
                if i.lifecycle_state() == Some(&LifecycleState::InService) {
                    ids.extend(i.instance_id().map(str::to_string));
                }
            }
        }
        match out.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => return Ok((ids, groups, desired)),
        }
    }
}

fn addresses(instances: &[Instance]) -> BTreeSet<Ipv4Addr> {
    instances.iter().filter(|i| i.state == "running").filter_map(|i| i.private_ip).collect()
}

#[async_trait::async_trait]
impl Source for AwsSource {
    async fn discover(&self) -> Result<Found, SourceError> {
        let mut guard = self.ready.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let ready = guard.as_ref().expect("connected");
        let me = ready.ec2.describe_instances(std::slice::from_ref(&ready.instance_id), &[]).await?;
        let me = me.into_iter().find(|i| i.id == ready.instance_id).ok_or_else(|| {
            SourceError(format!("EC2 does not know this instance ({}): is the metadata service lying?", ready.instance_id))
        })?;
        let running = ("instance-state-name", vec!["running".to_string()]);
        // 1. Instances tagged like this one.
        let tag = &self.settings.peer_group_tag;
        if let Some(value) = me.tags.get(tag).filter(|_| !tag.is_empty()) {
            let found = ready.ec2.describe_instances(&[], &[(&format!("tag:{tag}"), vec![value.clone()]), running]).await?;
            // Tagged instances have no desired capacity: the running ones count.
            return Ok(Found { me: me.private_ip, members: addresses(&found), group: format!("instances tagged {tag}={value}"), desired: 0 });
        }
        // 2. The Auto Scaling groups of this host's ECS cluster.
        if let Some(cluster) = self.ecs_cluster() {
            let filter = Filter::builder().name(format!("tag:{ECS_CLUSTER_TAG}")).values(cluster.clone()).build();
            let (ids, groups, desired) = in_service(&ready.asg, None, Some(filter)).await?;
            if !groups.is_empty() {
                let found = if ids.is_empty() { Vec::new() } else { ready.ec2.describe_instances(&ids, &[running]).await? };
                return Ok(Found {
                    me: me.private_ip,
                    members: addresses(&found),
                    group: format!("ECS cluster {cluster} (Auto Scaling groups {})", groups.join(", ")),
                    desired,
                });
            }
        }
        // 3. This instance's Auto Scaling group.
        let out = ready
            .asg
            .describe_auto_scaling_instances()
            .instance_ids(ready.instance_id.clone())
            .send()
            .await
            .map_err(|e| asg_err("DescribeAutoScalingInstances", &DisplayErrorContext(&e)))?;
        let Some(group) = out.auto_scaling_instances().first().and_then(|i| i.auto_scaling_group_name()).map(str::to_string) else {
            return Err(SourceError(format!(
                "instance {} is in no Auto Scaling group: start it from one, or tag the instances that belong together with {tag}=NAME",
                ready.instance_id
            )));
        };
        let (ids, _, desired) = in_service(&ready.asg, Some(vec![group.clone()]), None).await?;
        let found = if ids.is_empty() { Vec::new() } else { ready.ec2.describe_instances(&ids, &[running]).await? };
        Ok(Found { me: me.private_ip, members: addresses(&found), group: format!("Auto Scaling group {group}"), desired })
    }
}
