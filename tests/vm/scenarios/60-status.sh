# 60-status.sh - devio status (docs/cli.md) names a ublk server's device:
# the text and the JSON both say /dev/ublkbN, the source and the pid.
command -v pass >/dev/null 2>&1 || . /guest-lib.sh  # alone under run.sh --script

t=status-ublk-device
if start_ublk /tmp/st.log ram:16M --ublk; then
  wait_for 10 grep -q . /run/devio/$SRV.json
  devio status >/tmp/st.txt 2>&1
  devio status --json >/tmp/st.json 2>&1
  stop_server TERM
  if ! grep -q "^pid $SRV\$" /tmp/st.txt; then cat /tmp/st.txt; fail $t "no pid line"
  elif ! grep -q "^  device $DEV\$" /tmp/st.txt; then cat /tmp/st.txt; fail $t "text does not name $DEV"
  elif ! grep -q "\"device\": \"$DEV\"" /tmp/st.json; then cat /tmp/st.json; fail $t "JSON does not name $DEV"
  elif ! grep -q '"type": "ublk"' /tmp/st.json; then cat /tmp/st.json; fail $t "no ublk front end"
  elif [ -e /run/devio/$SRV.json ]; then fail $t "the entry stayed after the server stopped"
  else pass $t; fi
else
  fail $t "server did not start"; stop_server KILL
fi
