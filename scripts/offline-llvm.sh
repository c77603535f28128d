#!/bin/sh
# Lets `--features cuda` build without network access.
#
# burn 0.22.1's `cuda` -> burn-cuda -> cubecl-cuda 0.11 -> cubecl-llvm -> tracel-llvm-bundler,
# whose build script downloads a prebuilt LLVM 23 from GitHub unless
#   ${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-<version>/.tracel-llvm-installed
# exists; it then only runs <that folder>/bin/llvm-config. This script installs Debian's
# LLVM 22 (`llvm-22-dev`, plus `libzstd-dev`) with apt and puts it behind that path with an
# llvm-config wrapper that (a) turns absolute `/path/libfoo.so` system libraries (libz3) into
# `-lfoo` and (b) drops the Polly libraries, which Debian ships without static archives.
# So Flotilla's CUDA build links against LLVM 22 (the bundler expects 23: every C function
# cubecl-llvm calls exists in 22; two enums changed, used only when importing LLVM IR).
#
# Usage: sh scripts/offline-llvm.sh            (needs root for apt, once per machine)
# Then:  cargo build --release -p flotilla-client --features cuda
set -eu
cd "$(dirname "$0")/.."
LOCK=Cargo.lock
VER=$(awk '/^name = "tracel-llvm-bundler"$/{getline; gsub(/version = |"/,""); print; exit}' "$LOCK" 2>/dev/null || true)
VER=${VER:-23.1.0-4}
LLVM=22
if [ ! -x /usr/lib/llvm-$LLVM/bin/llvm-config ] || [ ! -e /usr/lib/x86_64-linux-gnu/libzstd.so ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends llvm-$LLVM-dev libzstd-dev >/dev/null
fi
DIR=${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-$VER
mkdir -p "$DIR/bin"
# Written to a temporary file and moved in only if it changed: a new mtime would make cargo
# rebuild llvm-sys and everything above it.
cat > "$DIR/bin/llvm-config.new" <<WRAP
#!/bin/sh
# Stand-in for tracel-llvm-bundler's LLVM $VER: Debian's llvm-$LLVM-dev (Flotilla's
# scripts/offline-llvm.sh).
REAL=/usr/lib/llvm-$LLVM/bin/llvm-config
out=\$("\$REAL" "\$@") || exit \$?
libdir=\$("\$REAL" --libdir)
res=""
for tok in \$(printf '%s\n' "\$out" | sed -E 's#(^| )/[^ ]*/lib([^ /]+)\\.so( |\$)#\\1-l\\2\\3#g'); do
  case "\$tok" in
    -lLLVM*|-lPolly*) [ -e "\$libdir/lib\${tok#-l}.a" ] || continue ;;
  esac
  res="\$res \$tok"
done
printf '%s\n' "\${res# }"
WRAP
if cmp -s "$DIR/bin/llvm-config.new" "$DIR/bin/llvm-config"; then
  rm "$DIR/bin/llvm-config.new"
else
  chmod +x "$DIR/bin/llvm-config.new"
  mv "$DIR/bin/llvm-config.new" "$DIR/bin/llvm-config"
fi
[ -e "$DIR/.tracel-llvm-installed" ] || touch "$DIR/.tracel-llvm-installed"
echo "tracel-llvm $VER stand-in -> Debian llvm-$LLVM ($(/usr/lib/llvm-$LLVM/bin/llvm-config --version)) at $DIR"
