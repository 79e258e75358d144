#!/usr/bin/env bash
# Creates, once per AWS account, the IAM roles and instance profiles that ray_cluster.yaml names, with the
# policies in this directory (run it with credentials that may create IAM roles):
#   eagle-audit-head  role + instance profile of the head: node-policy.json (the driver reads and writes S3) and
#                     head-policy.json (the autoscaler starts and stops workers, and may pass eagle-audit-node to
#                     them: iam:PassRole; without it every worker launch fails with UnauthorizedOperation).
#   eagle-audit-node  role + instance profile of the workers: node-policy.json.
# Optionally, for KubeRay on EKS (IRSA), with EKS_CLUSTER and NAMESPACE set: eagle-audit-irsa, a role that the
# eagle-audit ServiceAccount of that namespace may assume (irsa-trust-policy.json), with node-policy.json;
# annotate the ServiceAccount with the ARN it prints (infra/kuberay/serviceaccount.yaml).
# Edit node-policy.json first if your buckets are not plant-a (audit.yaml: inputs, model_store, output).
# `ray up` itself needs iam:PassRole on eagle-audit-head for whoever runs it.
#   infra/iam/create.sh                                       # EC2 roles and instance profiles
#   EKS_CLUSTER=my-cluster NAMESPACE=default infra/iam/create.sh   # ... and the IRSA role
set -euo pipefail
cd "$(dirname "$0")"

role_with_profile() {  # NAME: a role EC2 instances assume, and an instance profile of the same name holding it
    aws iam create-role --role-name "$1" --assume-role-policy-document file://ec2-trust-policy.json
    aws iam create-instance-profile --instance-profile-name "$1"
    aws iam add-role-to-instance-profile --instance-profile-name "$1" --role-name "$1"
}

role_with_profile eagle-audit-node
aws iam put-role-policy --role-name eagle-audit-node --policy-name eagle-audit-storage \
    --policy-document file://node-policy.json

role_with_profile eagle-audit-head
aws iam put-role-policy --role-name eagle-audit-head --policy-name eagle-audit-storage \
    --policy-document file://node-policy.json
aws iam put-role-policy --role-name eagle-audit-head --policy-name eagle-audit-autoscaler \
    --policy-document file://head-policy.json

if [[ -n "${EKS_CLUSTER:-}" ]]; then
    : "${NAMESPACE:?set NAMESPACE to the namespace of the eagle-audit ServiceAccount}"
    account=$(aws sts get-caller-identity --query Account --output text)
    issuer=$(aws eks describe-cluster --name "$EKS_CLUSTER" --query cluster.identity.oidc.issuer --output text)
    oidc=${issuer#https://}
    trust=$(mktemp)
    trap 'rm -f "$trust"' EXIT
    sed -e "s|ACCOUNT_ID|$account|g" -e "s|OIDC_PROVIDER|$oidc|g" -e "s|NAMESPACE|$NAMESPACE|g" \
        irsa-trust-policy.json > "$trust"
    aws iam create-role --role-name eagle-audit-irsa --assume-role-policy-document "file://$trust"
    aws iam put-role-policy --role-name eagle-audit-irsa --policy-name eagle-audit-storage \
        --policy-document file://node-policy.json
    echo "annotate the ServiceAccount: eks.amazonaws.com/role-arn: arn:aws:iam::$account:role/eagle-audit-irsa"
fi
