# Shared by scripts/demo.sh, scripts/test.sh and .ci/run: makes sure the
# servers and tools the project needs are installed. Sourced, not run.

# Debian packages: the servers the demo and tests start privately, protoc
# for etcd-client's build script, and promtool (with Prometheus) for the
# alert rules' unit tests. The packaged services are never used.
RESONANCE_PACKAGES=(nats-server etcd-server redis-server protobuf-compiler prometheus)

resonance_missing_packages() {
  local missing=()
  command -v nats-server >/dev/null || missing+=(nats-server)
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  command -v promtool >/dev/null || missing+=(prometheus)
  echo "${missing[@]}"
}

resonance_apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: $*" >&2
    echo "install them with: sudo apt-get update && sudo apt-get install -y $*" >&2
    return 1
  fi
  echo "installing: $*" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

resonance_ensure_tools() {
  local missing
  missing=$(resonance_missing_packages)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    resonance_apt_install $missing
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust from your distribution or rustup" >&2
    return 1
  fi
}

resonance_port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Sets each variable named to a free loopback port that this script has
# not handed out before (they are kept in $used_ports; in the calling shell,
# not a subshell, so two calls never give the same port).
resonance_free_ports() { # NAME...
  local name p
  for name in "$@"; do
    while :; do
      p=$((20000 + RANDOM % 30000))
      case "${used_ports:- }" in *" $p "*) continue ;; esac
      resonance_port_open "$p" && continue
      used_ports="${used_ports:- }$p "
      printf -v "$name" '%s' "$p"
      break
    done
  done
}

# Starts a command in the background with its output in $WORK/NAME.log and
# its pid appended to the caller's array pids.
resonance_start() { # name, command...
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  pids+=($!)
}

# Starts nats-server (JetStream; extra arguments appended), etcd and
# redis-server on $NATS_PORT, $ETCD_PORT (peer $ETCD_PEER) and $REDIS_PORT
# with their data in $WORK, waits until they listen, and exports the
# environment that points the service at them and at a SQLite file in
# $WORK. Returns 1 if one did not start.
resonance_start_engines() { # etcd member name, extra nats-server arguments...
  local name=$1 port; shift
  resonance_start nats nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" "$@"
  resonance_start etcd etcd --name "$name" --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "$name=http://127.0.0.1:$ETCD_PEER"
  resonance_start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK"
  for port in "$NATS_PORT" "$ETCD_PORT" "$REDIS_PORT"; do
    resonance_wait_port "$port" 300 || return 1
  done
  export RESONANCE_TASK__NATS__URL="nats://127.0.0.1:$NATS_PORT"
  export RESONANCE_TASK__ETCD__ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
  export RESONANCE_TASK__REDIS__ADDR="127.0.0.1:$REDIS_PORT"
  export RESONANCE_TASK__DATABASE__URL="sqlite://$WORK/task.db?mode=rwc"
}

resonance_wait_port() {
  local port=$1 tries=${2:-100}
  while ! resonance_port_open "$port"; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || return 1
    sleep 0.1
  done
}

# The test suite also uses the machine's MariaDB (127.0.0.1:3306, root, no
# password, database test) and PostgreSQL (127.0.0.1:5432, trust, database
# test). Start them if installed but stopped; install them if missing.
resonance_ensure_databases() {
  if ! resonance_port_open 3306; then
    if ! command -v mariadbd >/dev/null && ! command -v mysqld >/dev/null; then
      resonance_apt_install mariadb-server mariadb-client || return 1
    fi
    local daemon
    daemon=$(command -v mariadbd || command -v mysqld)
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec "$daemon" >&2 || "$daemon" --user=mysql >/dev/null 2>&1 &
    resonance_wait_port 3306 300 || { echo "MariaDB did not start on 3306" >&2; return 1; }
  fi
  mysql -h127.0.0.1 -uroot -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null 2>&1 \
    || mysql -uroot -e "CREATE DATABASE IF NOT EXISTS test; ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES;" >&2 \
    || true
  if ! resonance_port_open 5432; then
    if ! command -v pg_ctlcluster >/dev/null; then
      resonance_apt_install postgresql postgresql-client || return 1
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba" 2>/dev/null; then
      sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
    resonance_wait_port 5432 300 || { echo "PostgreSQL did not start on 5432" >&2; return 1; }
  fi
  psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test' >/dev/null 2>&1 || true
}
