#!/bin/sh
# Entrypoint of the compose service `seaweedfs` (docker/compose.yaml), the default S3 server.
#
# One SeaweedFS process. Its master, volume server and filer listen on the container's loopback
# only: their HTTP and gRPC APIs have no S3 credentials, so no other container may reach them.
# The S3 gateway (port 9000, and its gRPC port 19000) is all the compose network sees.
#
# Each party gets its own S3 identity, with the same policy document MinIO uses
# (docker/minio/<party>.json, mounted at $CT_S3_POLICY_DIR):
#
#   producer  writes new labelled batches under ct-data/raw/ and nothing else
#   airflow   extract, validate, drift and raw-data watch tasks, the report viewer
#   ray       training and evaluation jobs, Serve replicas (prediction log)
#   mlflow    the tracking server, which proxies every model and artifact in mlflow-artifacts
#
# No identity is an admin: the buckets are made through SeaweedFS's shell on the loopback. The
# identities file is written at every start from docker/.env (S3_<PARTY>_ACCESS_KEY and _SECRET_KEY)
# into $SEAWEEDFS_RUN_DIR (a tmpfs in compose), never into the data volume. A random key, new at
# every start, signs the filer's writes and the S3 gateway's IAM gRPC calls: without it the S3
# gRPC port would accept new identities from anyone who reaches it.
#
# The variables below exist so that tests/deploy/test_seaweedfs.py can run this script outside a
# container on spare ports; compose leaves them at their defaults.
set -eu

policy_dir=${CT_S3_POLICY_DIR:-/etc/ct-s3-policies}
data_dir=${SEAWEEDFS_DATA_DIR:-/data}
run_dir=${SEAWEEDFS_RUN_DIR:-/tmp/ct-seaweedfs}
s3_bind=${SEAWEEDFS_S3_BIND:-0.0.0.0}
s3_port=${SEAWEEDFS_S3_PORT:-9000}
master_port=${SEAWEEDFS_MASTER_PORT:-9333}
volume_port=${SEAWEEDFS_VOLUME_PORT:-8080}
filer_port=${SEAWEEDFS_FILER_PORT:-8888}
weed=${WEED:-weed}
parties="producer airflow ray mlflow"
buckets="ct-data mlflow-artifacts"

die() {
  echo "seaweedfs/start.sh: $*" >&2
  exit 1
}

# Keys go into JSON as they are: allow only characters that need no escaping there.
check_key() { # name value min_length
  case "$2" in
    *[!A-Za-z0-9._~+/=-]*) die "$1 may only hold letters, digits and . _ ~ + / = -" ;;
  esac
  [ "${#2}" -ge "$3" ] || die "$1 must be at least $3 characters long"
}

umask 077
rm -rf "$run_dir"
mkdir -p "$run_dir" "$data_dir"
config="$run_dir/s3.json"
seen=" "
{
  printf '{"identities": ['
  sep=""
  for party in $parties; do
    upper=$(echo "$party" | tr '[:lower:]' '[:upper:]')
    eval "access_key=\${S3_${upper}_ACCESS_KEY:?set S3_${upper}_ACCESS_KEY in docker/.env}"
    eval "secret_key=\${S3_${upper}_SECRET_KEY:?set S3_${upper}_SECRET_KEY in docker/.env}"
    check_key "S3_${upper}_ACCESS_KEY" "$access_key" 3
    check_key "S3_${upper}_SECRET_KEY" "$secret_key" 8
    case "$seen" in *" $access_key "*) die "S3_${upper}_ACCESS_KEY is another party's key too" ;; esac
    seen="$seen$access_key "
    printf '%s\n  {"name": "ct-%s", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "policyNames": ["ct-%s"]}' \
      "$sep" "$party" "$access_key" "$secret_key" "$party"
    sep=","
  done
  printf '\n], "policies": ['
  sep=""
  for party in $parties; do
    [ -f "$policy_dir/$party.json" ] || die "no policy $policy_dir/$party.json"
    printf '%s\n  {"name": "ct-%s", "document": ' "$sep" "$party"
    cat "$policy_dir/$party.json"
    printf '}'
    sep=","
  done
  printf '\n]}\n'
} >"$config"

WEED_JWT_FILER_SIGNING_KEY=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
WEED_JWT_SIGNING_KEY=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
export WEED_JWT_FILER_SIGNING_KEY WEED_JWT_SIGNING_KEY

"$weed" -logtostderr server -dir="$data_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="$master_port" -volume.port="$volume_port" -volume.max=0 \
  -master.volumeSizeLimitMB=1024 -filer -filer.port="$filer_port" \
  -s3 -s3.ip.bind="$s3_bind" -s3.port="$s3_port" -s3.config="$config" \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.allowDeleteBucketNotEmpty=false &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT

# The buckets, through the shell on the loopback, once the master and filer answer. Idempotent; the
# shell exits 1 for a bucket that exists already, so only its answer counts.
make_bucket() {
  out=$(echo "s3.bucket.create -name $1" |
    timeout 20 "$weed" shell -master="127.0.0.1:$master_port" -filer="127.0.0.1:$filer_port" 2>&1) || true
  case "$out" in *"created bucket $1"* | *"bucket $1 already exists"*) return 0 ;; esac
  return 1
}
for bucket in $buckets; do
  tries=0
  until make_bucket "$bucket"; do
    kill -0 "$pid" 2>/dev/null || die "weed exited before the buckets were made"
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || die "could not create bucket $bucket: $out"
    sleep 1
  done
done
tries=0
until wget -q -O /dev/null "http://127.0.0.1:$s3_port/healthz"; do # the S3 gateway answers too
  kill -0 "$pid" 2>/dev/null || die "weed exited before its S3 gateway answered"
  tries=$((tries + 1))
  [ "$tries" -lt 60 ] || die "the S3 gateway did not answer on port $s3_port"
  sleep 1
done
touch "$run_dir/ready" # the compose health check
echo "seaweedfs/start.sh: S3 on $s3_bind:$s3_port, buckets: $buckets"

status=0
wait "$pid" || status=$?
if kill -0 "$pid" 2>/dev/null; then # the trap interrupted the first wait
  wait "$pid" || status=$?
fi
exit "$status"
