#!/bin/sh
# Build and run the Java example client: Java sources generated from
# protos/shoal/v1/inference.proto by protoc + grpc-java's plugin, compiled with javac against
# Debian's grpc-java jars (/usr/share/java), into examples/clients/java/build/ (ignored).
# Rebuilt only when Client.java or the .proto changed. Arguments go to the client:
#
#   examples/clients/java/run.sh --target 127.0.0.1:50051 --prompt-token-ids 1,2,3 --max-new-tokens 8
#
# The toolchain, on Debian 12 (bookworm); libgrpc-java alone does not pull in the netty,
# protobuf and perfmark jars it needs:
#
#   apt-get install -y default-jdk-headless protobuf-compiler protobuf-compiler-grpc-java-plugin \
#       libgrpc-java libprotobuf-java libnetty-java libperfmark-java libguava-java \
#       libgeronimo-annotation-1.3-spec-java
#
# `run.sh --packages` prints that package list; `run.sh --build-only` builds and stops.
# Exit status 77 (and a line on stderr) when a tool or jar is missing: nothing was run.
set -eu

PACKAGES="default-jdk-headless protobuf-compiler protobuf-compiler-grpc-java-plugin libgrpc-java
    libprotobuf-java libnetty-java libperfmark-java libguava-java libgeronimo-annotation-1.3-spec-java"
if [ "${1:-}" = --packages ]; then
    echo $PACKAGES
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
build="$here/build"
jars=${JAVA_JARS:-/usr/share/java}
proto="$repo/protos/shoal/v1/inference.proto"

missing() {
    echo "run.sh: $1 not found (Debian: apt-get install -y $2)" >&2
    exit 77
}

for tool in protoc:protobuf-compiler javac:default-jdk-headless java:default-jdk-headless; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing "${tool%%:*}" "${tool#*:}"
done
# grpc-java's protoc plugin: Debian installs it as grpc_java_plugin; upstream's name is
# protoc-gen-grpc-java. GRPC_JAVA_PLUGIN=/path/to/it overrides the search.
plugin=${GRPC_JAVA_PLUGIN:-}
if [ -z "$plugin" ]; then
    plugin=$(command -v protoc-gen-grpc-java || command -v grpc_java_plugin ||
        find /usr/lib /usr/libexec -name 'protoc-gen-grpc-java*' -type f 2>/dev/null | head -n 1 || true)
fi
[ -n "$plugin" ] && [ -x "$plugin" ] || missing "grpc-java's protoc plugin" protobuf-compiler-grpc-java-plugin

# The runtime: grpc-java (API, core, netty transport, protobuf marshalling, stubs) and what it
# stands on. geronimo-annotation provides javax.annotation.Generated for the generated stub.
classpath=
for jar in grpc-api:libgrpc-java grpc-context:libgrpc-java grpc-core:libgrpc-java \
    grpc-netty:libgrpc-java grpc-protobuf:libgrpc-java grpc-protobuf-lite:libgrpc-java \
    grpc-stub:libgrpc-java protobuf:libprotobuf-java guava:libguava-java \
    perfmark-api:libperfmark-java netty-buffer:libnetty-java netty-codec:libnetty-java \
    netty-codec-http:libnetty-java netty-codec-http2:libnetty-java netty-common:libnetty-java \
    netty-handler:libnetty-java netty-resolver:libnetty-java netty-transport:libnetty-java \
    geronimo-annotation-1.3-spec:libgeronimo-annotation-1.3-spec-java; do
    file="$jars/${jar%%:*}.jar"
    [ -f "$file" ] || missing "$file" "${jar#*:}"
    classpath="$classpath${classpath:+:}$file"
done

stamp="$build/classes/.built"
if [ ! -f "$stamp" ] || [ "$here/Client.java" -nt "$stamp" ] || [ "$proto" -nt "$stamp" ] ||
    [ "$0" -nt "$stamp" ]; then
    rm -rf "$build"
    mkdir -p "$build/gen" "$build/classes"
    protoc -I"$repo/protos" --plugin=protoc-gen-grpc-java="$plugin" \
        --java_out="$build/gen" --grpc-java_out="$build/gen" "$proto"
    # shellcheck disable=SC2046
    javac -nowarn -d "$build/classes" -cp "$classpath" \
        $(find "$build/gen" -name '*.java') "$here/Client.java"
    touch "$stamp"
fi
if [ "${1:-}" = --build-only ]; then
    exit 0
fi
exec java -cp "$build/classes:$classpath" Client "$@"
